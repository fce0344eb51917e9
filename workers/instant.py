"""The instant stage of a semi-parametric model's forget requests: their samples leave the deployed
version's datastore within seconds, long before the batch that unlearns the encoder.

Runs in a control-queue task (qforget.take_instant_effect), not in the API: the API never loads
torch or the model store's artifacts, and rewriting a datastore of tens of thousands of rows for
each request would stall the intake's group commit. The task reads its work from the database (every
part of the model, pending or batched, without an instant version), so a lost or repeated wake-up
costs at most a no-op: the API sends one after the commit that files the request, and the scheduler
sends one every tick while such parts wait (docs/design.md, invariant 1). One transaction, under the
model's row lock (which a batch's deployment also takes), writes the new version, deploys it, and
marks the parts; a crash before its commit leaves the parts as they were, and the next wake-up does
it again (the file written before is content-addressed: the same bytes, the same name).

The new version has the encoder and fusion of its parent, the datastore without the rows of the
parts' samples. Its lineage (excluded_sample_ids) is its parent's: the model still holds the
samples, through the encoder, until the batch forgets them. Per-sample figures of the parent and
the new version on those samples are recorded after the commit, for the request's evidence.
"""

import logging
from pathlib import Path

from sqlalchemy import Engine, select

from service.core.audit_log import append_audit
from service.core.db import transaction
from service.core.models import (
    ForgetRequestPart,
    ForgetRequestSample,
    Model,
    ModelVersion,
    RequestStatus,
    Sample,
    VersionKind,
    utcnow,
)
from service.core.settings import Settings
from service.requests import lifecycle
from service.requests.holdings import erased_indices, held_by
from workers import engine as qf
from workers.evaluation.samples import assess_samples, record_sample_scores
from workers.runtime import WORKER_ID, load_data, readable_indices

log = logging.getLogger(__name__)

METHOD = "datastore-removal"


def datastore_removals(session, model: Model) -> list[int]:
    """Dataset indices of every sample the model's datastore must not hold: the samples of its parts
    that had their instant stage (whatever became of them since)."""
    return sorted(set(session.scalars(
        select(Sample.dataset_index)
        .join(ForgetRequestSample, ForgetRequestSample.sample_id == Sample.id)
        .join(ForgetRequestPart, ForgetRequestPart.request_id == ForgetRequestSample.request_id)
        .where(ForgetRequestPart.model_name == model.name, ForgetRequestPart.instant_version_id.is_not(None),
               Sample.dataset == model.dataset)
    )))


def take_instant_effect(engine: Engine, settings: Settings, model_name: str, evidence: bool = True) -> int | None:
    """Deploy the model's version without the samples of its parts awaiting their instant stage, and
    mark those parts; returns the new version's id, None when there was nothing to do. evidence: then
    record the figures (the benchmark times the stage without them)."""
    actor = f"worker:{WORKER_ID}"
    with transaction(engine) as session:
        model = session.get(Model, model_name, with_for_update=True)
        if model is None or not model.semi_parametric or model.deployed_version_id is None:
            return None
        parts = session.scalars(
            select(ForgetRequestPart)
            .where(ForgetRequestPart.model_name == model_name, ForgetRequestPart.instant_version_id.is_(None),
                   ForgetRequestPart.status.in_((RequestStatus.pending, RequestStatus.batched)))
            .order_by(ForgetRequestPart.request_id)
            .with_for_update()
        ).all()
        if not parts:
            return None
        samples = session.execute(
            select(Sample.id, Sample.dataset_index).distinct()
            .join(ForgetRequestSample, ForgetRequestSample.sample_id == Sample.id)
            .where(ForgetRequestSample.request_id.in_([part.request_id for part in parts]),
                   Sample.dataset == model.dataset)
            .order_by(Sample.id)
        ).all()
        parent = session.get(ModelVersion, model.deployed_version_id)
        network, spec = qf.load_artifact(Path(parent.artifact_path), parent.sha256)
        removed = network.remove_samples([row.dataset_index for row in samples])
        path, sha256 = qf.save_artifact(network, spec, Path(settings.model_store))
        now = utcnow()
        version = ModelVersion(
            model_name=model_name, kind=VersionKind.unlearned, parent_id=parent.id, batch_id=None, method=METHOD,
            config={"datastore_rows_removed": removed, "datastore_rows": network.datastore_size()},
            metrics={}, sha256=sha256, artifact_path=str(path), excluded_sample_ids=list(parent.excluded_sample_ids),
            created_at=now,
        )
        session.add(version)
        session.flush()
        model.deployed_version_id = version.id
        append_audit(session, actor=actor, action="model.deployed", object_type="model_version",
                     object_id=str(version.id),
                     details={"model": model_name, "parent_version_id": parent.id, "stage": "instant",
                              "sha256": sha256, "datastore_rows_removed": removed})
        lifecycle.take_effect(session, parts, version, actor, now)
        parent_id, sample_ids = parent.id, [row.id for row in samples]
    log.info("instant stage of model %s: version %s deployed, %d datastore rows removed", model_name, version.id,
             removed, extra={"version_id": version.id})
    if not evidence:
        return version.id
    try:
        record_instant_evidence(engine, settings, model_name, parent_id, version.id, sample_ids)
    except Exception:  # the erasure stands; only its figures are missing, which the evidence says
        log.exception("instant stage of model %s: figures not recorded", model_name)
    return version.id


def record_instant_evidence(engine: Engine, settings: Settings, model_name: str, parent_id: int, version_id: int,
                            sample_ids: list[int]) -> None:
    """Per-sample figures of the parent and the instant version on the samples it removed."""
    with transaction(engine) as session:
        model = session.get(Model, model_name)
        held = session.execute(held_by(model.name, model.dataset)).all()
        erased = erased_indices(session, model.dataset)
        versions = {role: session.get(ModelVersion, version) for role, version in
                    (("before", parent_id), ("after", version_id))}
        paths = {role: (Path(v.artifact_path), v.sha256) for role, v in versions.items()}
        spec = qf.ModelSpec.from_dict(model.spec)
    data = load_data(spec, erased)
    wanted = set(sample_ids)
    forget_rows = [row for row in held if row.id in wanted and row.dataset_index < len(data.train)]
    retain_indices, _ = readable_indices([row.dataset_index for row in held if row.id not in wanted], len(data.train))
    forget = data.train.subset([row.dataset_index for row in forget_rows])
    retain = data.train.subset(retain_indices)
    assessments = {}
    for role, (path, sha256) in paths.items():
        network, _ = qf.load_artifact(path, sha256, device=settings.torch_device)
        assessments[role] = assess_samples(network, forget, retain, data.test, settings.torch_device)
    with transaction(engine) as session:
        ids = [row.id for row in forget_rows]
        record_sample_scores(session, parent_id, ids, assessments["before"])
        record_sample_scores(session, version_id, ids, assessments["after"])
        session.get(ModelVersion, version_id).metrics = assessments["after"].metrics
