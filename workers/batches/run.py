"""Running the model's unlearning method (Q-MUL unless set otherwise) on a claimed batch, and the
quality gate that decides whether its version is deployed or held. The new version, its evidence
and its deployment (or hold) are recorded in one transaction, by the lease holder only
(docs/design.md, invariants 2 and 7)."""

import logging
from dataclasses import dataclass, fields
from pathlib import Path

from sqlalchemy import Engine, select

from service.core.audit_log import append_audit
from service.core.db import transaction
from service.core.models import (
    Batch,
    BatchStatus,
    ForgetRequestPart,
    ForgetRequestSample,
    Model,
    ModelVersion,
    VersionKind,
)
from service.core.settings import Settings
from service.deployments.deploy import deploy_version
from service.requests import lifecycle
from service.requests.holdings import erased_indices, held_by
from workers import engine as qf
from workers.batches.claims import ClaimedBatch, LeaseKeeper
from workers.evaluation.samples import SampleAssessment, assess_samples, record_sample_scores
from workers.instant import datastore_removals
from workers.runtime import WORKER_ID, artifact_spec, load_data, readable_indices

log = logging.getLogger(__name__)


def run_batch(engine: Engine, settings: Settings, claimed: ClaimedBatch, progress: bool = False) -> int | None:
    """Run the model's method for a claimed batch and deploy the result. Returns the new version id."""
    with transaction(engine) as session:
        model = session.get(Model, claimed.model_name)
        parent = session.get(ModelVersion, claimed.parent_version_id)
        # The batch's requests' samples that the model still holds: the forget set; the rest of what
        # it holds: the retain set.
        batch_samples = select(ForgetRequestSample.sample_id).join(
            ForgetRequestPart, ForgetRequestPart.request_id == ForgetRequestSample.request_id
        ).where(ForgetRequestPart.batch_id == claimed.batch_id)
        held = session.execute(held_by(model.name, model.dataset)).all()
        in_batch = set(session.scalars(batch_samples))
        spec = qf.ModelSpec.from_dict(model.spec)
        erased = erased_indices(session, model.dataset)
        method, config = unlearn_config(settings, model)
        parent_path, parent_sha256 = parent.artifact_path, parent.sha256
    forget_rows = [row for row in held if row.id in in_batch]
    forget_ids = [row.id for row in forget_rows]
    forget_indices = sorted(row.dataset_index for row in forget_rows)
    id_of_index = {row.dataset_index: row.id for row in forget_rows}

    keeper = LeaseKeeper(engine, claimed.batch_id, settings.lease_seconds)
    keeper.start()
    try:
        data = load_data(spec, erased)
        retain_indices, unreadable = readable_indices(
            [row.dataset_index for row in held if row.id not in in_batch], len(data.train))
        if forget_indices and forget_indices[-1] >= len(data.train):
            raise UnreadableSamples(f"{sum(i >= len(data.train) for i in forget_indices)} samples to forget lie "
                                    f"beyond the data set's {len(data.train)} training samples")
        if unreadable:
            log.warning("batch %s: %d retain samples beyond the data set's %d skipped", claimed.batch_id,
                        unreadable, len(data.train))
        network, _ = qf.load_artifact(Path(parent_path), parent_sha256, device=settings.torch_device)
        forget, retain = data.train.subset(forget_indices), data.train.subset(retain_indices)
        log.info("batch %s: %s on %d forget / %d retain samples", claimed.batch_id, method, len(forget), len(retain))
        result = qf.unlearn(method, network, forget, retain, config, device=settings.torch_device, progress=progress)
        if spec.spm is not None:
            # The datastore's embeddings came from the encoder before; the unlearned one embeds the
            # retained samples again (the forgotten ones are not among them).
            qf.build_datastore(result.model, retain, retain_indices, settings.torch_device)
        # Per-request evidence: the batch's samples before (the parent) and after (the new version).
        evidence = BatchEvidence(
            sample_ids=[id_of_index[index] for index in forget_indices],
            before=assess_samples(network, forget, retain, data.test, settings.torch_device),
            after=assess_samples(result.model, forget, retain, data.test, settings.torch_device),
        )
        metrics = dict(evidence.after.metrics)
        if spec.spm is None:  # the integer export rebuilds plain classifiers, not an SPM's datastore
            metrics["integer_export"] = integer_export_check(result.model, spec, forget, retain, data.test,
                                                             settings.torch_device)
        path, sha256 = qf.save_artifact(result.model, artifact_spec(spec), Path(settings.model_store))
    finally:
        keeper.stop()
    if keeper.lost:
        log.warning("batch %s: lease lost during the run; another worker owns it now", claimed.batch_id)
        return None
    return _record_result(engine, settings, claimed, forget_ids, path, sha256, (method, config), metrics,
                          result.history, evidence, unreadable)


def integer_export_check(network, spec: qf.ModelSpec, forget: qf.Split, retain: qf.Split, test: qf.Split,
                         device: str) -> dict:
    """Whether quantization brings forgetting back: FA and MIA of the version's integer export (what
    an edge device runs) beside those of the fake-quantized model the evidence evaluates, on the
    batch's forget set, and how far their predictions and membership calls agree
    (qf.export_fidelity). An architecture the export cannot rebuild is recorded as such, not a
    failed erasure."""
    try:
        integer = qf.integer_model(qf.export_integer(network), **spec.model_kwargs()).to(device)
    except (ValueError, TypeError, NotImplementedError, KeyError) as error:
        log.warning("integer export check skipped: %s", error)
        return {"error": f"{type(error).__name__}: {error}"}
    check = qf.export_fidelity(network, integer, forget, retain, test, device)
    return {"FA": check["integer"]["FA"], "MIA": check["integer"]["MIA"],
            "fake_quantized_FA": check["fake_quantized"]["FA"], "fake_quantized_MIA": check["fake_quantized"]["MIA"],
            "prediction_agreement": check["prediction_agreement"],
            "membership_agreement": check["membership_agreement"], "within_tolerance": check["within_tolerance"]}


def without_removed_rows(session, model: Model, path: Path, sha256: str, settings: Settings) -> tuple[Path, str]:
    """The artifact of an SPM's new version without the datastore rows of samples whose instant stage
    ran while the batch did (their removal deployed after this run's parent): the version to deploy
    must not bring them back. Called under the model's row lock, which the instant stage takes too."""
    removals = datastore_removals(session, model)
    network, spec = qf.load_artifact(path, sha256)
    if not network.remove_samples(removals):
        return path, sha256
    log.info("model %s: %d datastore rows removed meanwhile also left the batch's version", model.name,
             len(removals))
    return qf.save_artifact(network, spec, Path(settings.model_store))


class UnreadableSamples(RuntimeError):
    """Samples to forget that the data set does not have: the run cannot show they were forgotten."""


def unlearn_config(settings: Settings, model: Model) -> tuple[str, object]:
    """The model's method and its engine config: the service-wide settings the method has, then
    what an admin set for the model (a key the method does not have fails the run, saying so)."""
    service_wide = settings.unlearn_settings()
    overrides = dict(model.unlearn_config or {})
    method = overrides.pop("method", service_wide.pop("method"))
    known = {field.name for field in fields(qf.method_config(method))}  # its defaults' fields (an unknown name raises)
    values = {key: value for key, value in service_wide.items() if key in known} | overrides
    if "grad_norm_batches" in values:
        values["grad_norm_batches"] = values["grad_norm_batches"] or None  # 0: a full pass
    return method, qf.method_config(method, values)


@dataclass(frozen=True)
class BatchEvidence:
    sample_ids: list[int]  # in the order of the assessments' arrays
    before: SampleAssessment  # the parent version
    after: SampleAssessment  # the new version


def _record_result(engine, settings, claimed, forget_ids, path, sha256, run: tuple[str, object], metrics, history,
                   evidence: BatchEvidence | None = None, unreadable: int = 0) -> int | None:
    """One transaction: the new version (made by `run`, the method and its config) and its evidence,
    then either its deployment or a hold by the quality gate."""
    method, config = run
    actor = f"worker:{WORKER_ID}"
    with transaction(engine) as session:
        batch = session.get(Batch, claimed.batch_id, with_for_update=True)
        if batch.status != BatchStatus.running or batch.lease_owner != WORKER_ID:
            return None  # already deployed by this batch's run, or taken over: deploy nothing
        model = session.get(Model, claimed.model_name, with_for_update=True)
        parent = session.get(ModelVersion, batch.parent_version_id)
        if model.semi_parametric:
            path, sha256 = without_removed_rows(session, model, path, sha256, settings)
        version = ModelVersion(
            model_name=model.name,
            kind=VersionKind.unlearned,
            parent_id=batch.parent_version_id,
            batch_id=batch.id,
            method=method,
            config={**vars(config), "history": history},
            metrics=metrics,
            sha256=sha256,
            artifact_path=str(path),
            excluded_sample_ids=sorted({*parent.excluded_sample_ids, *forget_ids}),
        )
        session.add(version)
        session.flush()
        if unreadable:
            append_audit(session, actor=actor, action="batch.samples_skipped", object_type="batch",
                         object_id=str(batch.id), details={"unreadable_retain_samples": unreadable})
        batch.result_version_id = version.id
        if evidence is not None:
            record_sample_scores(session, batch.parent_version_id, evidence.sample_ids, evidence.before)
            record_sample_scores(session, version.id, evidence.sample_ids, evidence.after)
        drop = parent.metrics.get("TA", metrics["TA"]) - metrics["TA"]
        if drop > settings.quality_gate_max_ta_drop:
            reason = (f"test accuracy fell {drop:.2f} points (parent {parent.metrics['TA']:.2f}, "
                      f"new {metrics['TA']:.2f}); the gate allows {settings.quality_gate_max_ta_drop}")
            lifecycle.hold(session, batch, version, reason, actor)
            log.warning("batch %s held for review: %s", batch.id, batch.hold_reason)
            return None
        deploy_version(session, batch, model, version, forget_ids, actor)
        return version.id
