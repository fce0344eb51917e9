"""Claim a batch of forget requests, run Q-MUL on it, and deploy the result in one transaction.

Also trains retrain references and records evaluations of the deployment against them.

The database decides who runs what (DESIGN.md invariants 2, 3, 7):
- claiming locks the model row (FOR UPDATE SKIP LOCKED on PostgreSQL; SQLite serialises every
  transaction) and creates at most one `running` batch per model (a partial unique index);
- the running worker renews the batch's lease; a batch whose lease expired is taken over and run
  again from the same parent version;
- the new version is deployed, the requests completed and the samples forgotten in one
  transaction, and only by the lease holder, so a batch is never applied twice.
"""

import hashlib
import json
import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import Engine, delete, insert, select, update

from service.audit_log import append_audit
from service.db import transaction
from service.deployments import deploy_version
from service.models import (
    Batch,
    BatchStatus,
    Evaluation,
    ForgetRequest,
    Model,
    ModelVersion,
    ReferenceRequest,
    RequestStatus,
    Sample,
    SampleScore,
    SampleStatus,
    VersionKind,
    as_utc,
    utcnow,
)
from service.settings import Settings
from workers import engine as qf
from workers.engine.metrics import (
    membership_attacker,
    metrics_from_probs,
    per_sample_loss,
    split_probs,
    true_class_probs,
)

log = logging.getLogger(__name__)

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class ClaimedBatch:
    batch_id: int
    model_name: str
    parent_version_id: int


def configure_torch(settings: Settings) -> None:
    """Apply QFORGET_TORCH_THREADS (0 leaves torch's choice). On a small shared CPU one thread is
    often faster: idle OpenMP threads spin while another process holds the other core."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)


_loaded_data: dict[tuple, qf.DatasetSplits] = {}


def load_data(spec: qf.ModelSpec) -> qf.DatasetSplits:
    """The spec's data set (with its seed and options), loaded once per worker process."""
    key = (spec.dataset, spec.data_seed, json.dumps(spec.data_options, sort_keys=True))
    if key not in _loaded_data:
        _loaded_data[key] = spec.load_data()
    return _loaded_data[key]


def artifact_spec(spec: qf.ModelSpec) -> dict:
    """What an artifact records so that it can be rebuilt without the database."""
    return {"model": spec.model_kwargs(), "dataset": spec.dataset}


@dataclass(frozen=True)
class SampleAssessment:
    """A version's FA, RA, TA and MIA, its per-sample figures on the forget split (in the split's
    order), and the membership scores (per-sample loss, -ln p of the true label) of the forget and
    test splits: all from one inference per split."""

    metrics: dict[str, float]
    correct: np.ndarray
    confidence: np.ndarray
    member: np.ndarray
    forget_loss: np.ndarray
    test_loss: np.ndarray


def assess_samples(network, forget: qf.Split, retain: qf.Split, test: qf.Split, device: str,
                   seed: int = 0) -> SampleAssessment:
    """The metrics (as qf.evaluate) and, per forget sample: predicted right, the true label's
    softmax probability, and the MIA attacker's call (the classifier behind MIA, fitted on this
    version's retain vs test)."""
    probs = split_probs(network, forget, retain, test, device)
    confidence = {key: true_class_probs(probs[key], split.y)
                  for key, split in (("FA", forget), ("RA", retain), ("TA", test))}
    attacker = membership_attacker(confidence["RA"], confidence["TA"], seed)
    return SampleAssessment(
        metrics=metrics_from_probs(probs, forget, retain, test, seed, attacker),  # one fit serves both
        correct=(probs["FA"].argmax(dim=1) == forget.y).numpy(),
        confidence=confidence["FA"][:, 0],
        member=attacker.predict(confidence["FA"]) == 1,
        forget_loss=per_sample_loss(probs["FA"], forget.y),
        test_loss=per_sample_loss(probs["TA"], test.y),
    )


# Membership score histograms: the loss spans many decades (a memorised sample has ~1e-6), so
# the bins are log-spaced, with a first bin [0, 1e-6) for saturated confidences.
SCORE_BIN_EDGES = [0.0, *np.geomspace(1e-6, 30.0, 31).round(8).tolist()]


def score_histogram(losses: np.ndarray) -> list[int]:
    clipped = np.clip(losses, 0.0, SCORE_BIN_EDGES[-1])
    return np.histogram(clipped, bins=SCORE_BIN_EDGES)[0].astype(int).tolist()


def record_sample_scores(session, version_id: int, sample_ids: list[int], assessment: SampleAssessment) -> None:
    """Store (replacing earlier ones) a version's figures on the given samples, in the split's order."""
    now = utcnow()
    for start in range(0, len(sample_ids), 5000):  # bounded statement size on both databases
        chunk = sample_ids[start:start + 5000]
        session.execute(delete(SampleScore).where(SampleScore.version_id == version_id,
                                                  SampleScore.sample_id.in_(chunk)))
    if sample_ids:
        session.execute(insert(SampleScore), [
            {"version_id": version_id, "sample_id": sample_id, "correct": bool(assessment.correct[i]),
             "confidence": float(assessment.confidence[i]), "member": bool(assessment.member[i]),
             "computed_at": now}
            for i, sample_id in enumerate(sample_ids)
        ])


def claim_batch(engine: Engine, settings: Settings, model_name: str) -> ClaimedBatch | None:
    """Claim every pending request of the model, or take over a batch whose lease expired."""
    with transaction(engine) as session:
        model = session.scalars(
            select(Model).where(Model.name == model_name).with_for_update(skip_locked=True)
        ).first()
        if model is None or model.deployed_version_id is None:
            return None  # unknown, not yet bootstrapped, or another worker is claiming right now
        now = utcnow()
        lease_until = now + timedelta(seconds=settings.lease_seconds)
        open_batch = session.scalars(
            select(Batch).where(Batch.model_name == model_name,
                                Batch.status.in_([BatchStatus.running, BatchStatus.held]))
        ).first()
        if open_batch is not None and open_batch.status == BatchStatus.held:
            return None  # waits for an admin: a new run would race the held version's review
        running = open_batch
        if running is not None:
            if as_utc(running.lease_expires_at) > now:
                return None  # alive on another worker: one run per model at a time
            return _take_over(session, settings, running, lease_until)
        pending = session.scalars(
            select(ForgetRequest)
            .where(ForgetRequest.model_name == model_name, ForgetRequest.status == RequestStatus.pending)
            .order_by(ForgetRequest.received_at)
            .with_for_update(skip_locked=True)
        ).all()
        if not pending:
            return None
        batch = Batch(
            model_name=model_name,
            status=BatchStatus.running,
            parent_version_id=model.deployed_version_id,
            lease_owner=WORKER_ID,
            lease_expires_at=lease_until,
        )
        session.add(batch)
        session.flush()
        for request in pending:
            request.status = RequestStatus.batched
            request.batch_id = batch.id
        append_audit(
            session,
            actor=f"worker:{WORKER_ID}",
            action="batch.claimed",
            object_type="batch",
            object_id=str(batch.id),
            details={
                "model": model_name,
                "parent_version_id": batch.parent_version_id,
                "requests": [request.id for request in pending],
            },
        )
        return ClaimedBatch(batch.id, model_name, batch.parent_version_id)


def _take_over(session, settings: Settings, batch: Batch, lease_until) -> ClaimedBatch | None:
    batch.attempts += 1
    if batch.attempts > settings.max_attempts:
        # Never silently dropped: the requests go back to pending with the error recorded.
        error = f"batch {batch.id} abandoned after {settings.max_attempts} attempts: {batch.error or 'worker lost'}"
        batch.status = BatchStatus.failed
        batch.finished_at = utcnow()
        batch.error = error
        session.execute(
            update(ForgetRequest)
            .where(ForgetRequest.batch_id == batch.id)
            .values(status=RequestStatus.pending, batch_id=None, error=error)
        )
        append_audit(
            session, actor=f"worker:{WORKER_ID}", action="batch.failed", object_type="batch",
            object_id=str(batch.id), details={"error": error},
        )
        return None
    previous_owner = batch.lease_owner
    batch.lease_owner = WORKER_ID
    batch.lease_expires_at = lease_until
    append_audit(
        session, actor=f"worker:{WORKER_ID}", action="batch.lease_taken_over", object_type="batch",
        object_id=str(batch.id), details={"previous_owner": previous_owner, "attempt": batch.attempts},
    )
    return ClaimedBatch(batch.id, batch.model_name, batch.parent_version_id)


class LeaseKeeper(threading.Thread):
    """Renews a batch's lease while the run goes on; notices when the lease was lost."""

    def __init__(self, engine: Engine, batch_id: int, lease_seconds: int):
        super().__init__(daemon=True, name=f"lease-{batch_id}")
        self.engine, self.batch_id, self.lease_seconds = engine, batch_id, lease_seconds
        self.stopped = threading.Event()
        self.lost = False

    def run(self) -> None:
        while not self.stopped.wait(self.lease_seconds / 3):
            with transaction(self.engine) as session:
                renewed = session.execute(
                    update(Batch)
                    .where(Batch.id == self.batch_id, Batch.lease_owner == WORKER_ID,
                           Batch.status == BatchStatus.running)
                    .values(lease_expires_at=utcnow() + timedelta(seconds=self.lease_seconds))
                ).rowcount
            if not renewed:
                self.lost = True
                return

    def stop(self) -> None:
        self.stopped.set()


def run_batch(engine: Engine, settings: Settings, claimed: ClaimedBatch, progress: bool = False) -> int | None:
    """Run Q-MUL for a claimed batch and deploy the result. Returns the new version id."""
    with transaction(engine) as session:
        model = session.get(Model, claimed.model_name)
        parent = session.get(ModelVersion, claimed.parent_version_id)
        forget_rows = session.execute(
            select(Sample.id, Sample.dataset_index)
            .join(ForgetRequest.samples)
            .where(ForgetRequest.batch_id == claimed.batch_id)
            .order_by(Sample.id)
        ).all()
        forget_ids = sorted({row.id for row in forget_rows})
        retain_indices = session.scalars(
            select(Sample.dataset_index)
            .where(Sample.dataset == model.dataset, Sample.status == SampleStatus.active,
                   Sample.id.not_in(forget_ids))
            .order_by(Sample.dataset_index)
        ).all()
        spec = qf.ModelSpec.from_dict(model.spec)
        config = unlearn_config(settings, model)
        parent_path, parent_sha256 = parent.artifact_path, parent.sha256
    forget_indices = sorted({row.dataset_index for row in forget_rows})
    id_of_index = {row.dataset_index: row.id for row in forget_rows}

    keeper = LeaseKeeper(engine, claimed.batch_id, settings.lease_seconds)
    keeper.start()
    try:
        data = load_data(spec)
        network, _ = qf.load_artifact(Path(parent_path), parent_sha256, device=settings.torch_device)
        forget, retain = data.train.subset(forget_indices), data.train.subset(retain_indices)
        log.info("batch %s: Q-MUL on %d forget / %d retain samples", claimed.batch_id, len(forget), len(retain))
        result = qf.qmul_unlearn(network, forget, retain, config, device=settings.torch_device, progress=progress)
        # Per-request evidence: the batch's samples before (the parent) and after (the new version).
        evidence = BatchEvidence(
            sample_ids=[id_of_index[index] for index in forget_indices],
            before=assess_samples(network, forget, retain, data.test, settings.torch_device),
            after=assess_samples(result.model, forget, retain, data.test, settings.torch_device),
        )
        metrics = evidence.after.metrics
        path, sha256 = qf.save_artifact(result.model, artifact_spec(spec), Path(settings.model_store))
    finally:
        keeper.stop()
    if keeper.lost:
        log.warning("batch %s: lease lost during the run; another worker owns it now", claimed.batch_id)
        return None
    return _record_result(engine, settings, claimed, forget_ids, path, sha256, config, metrics, result.history,
                          evidence)


def unlearn_config(settings: Settings, model: Model) -> qf.QMulConfig:
    """The service-wide Q-MUL settings, overridden by what an admin set for this model."""
    return qf.QMulConfig(**{"epochs": settings.unlearn_epochs, "lr": settings.unlearn_lr,
                            "grad_norm_batches": settings.unlearn_grad_norm_batches or None,
                            **(model.unlearn_config or {})})


@dataclass(frozen=True)
class BatchEvidence:
    sample_ids: list[int]  # in the order of the assessments' arrays
    before: SampleAssessment  # the parent version
    after: SampleAssessment  # the new version


def _record_result(engine, settings, claimed, forget_ids, path, sha256, config, metrics, history,
                   evidence: BatchEvidence | None = None) -> int | None:
    """One transaction: the new version and its evidence, then either its deployment or a hold by
    the quality gate."""
    actor = f"worker:{WORKER_ID}"
    with transaction(engine) as session:
        batch = session.get(Batch, claimed.batch_id, with_for_update=True)
        if batch.status != BatchStatus.running or batch.lease_owner != WORKER_ID:
            return None  # already deployed by this batch's run, or taken over: deploy nothing
        model = session.get(Model, claimed.model_name, with_for_update=True)
        parent = session.get(ModelVersion, batch.parent_version_id)
        previously_forgotten = session.scalars(
            select(Sample.id).where(Sample.dataset == model.dataset, Sample.status == SampleStatus.forgotten)
        ).all()
        version = ModelVersion(
            model_name=model.name,
            kind=VersionKind.unlearned,
            parent_id=batch.parent_version_id,
            batch_id=batch.id,
            method="qmul",
            config={**vars(config), "history": history},
            metrics=metrics,
            sha256=sha256,
            artifact_path=str(path),
            excluded_sample_ids=sorted([*previously_forgotten, *forget_ids]),
        )
        session.add(version)
        session.flush()
        batch.result_version_id = version.id
        if evidence is not None:
            record_sample_scores(session, batch.parent_version_id, evidence.sample_ids, evidence.before)
            record_sample_scores(session, version.id, evidence.sample_ids, evidence.after)
        drop = parent.metrics.get("TA", metrics["TA"]) - metrics["TA"]
        if drop > settings.quality_gate_max_ta_drop:
            batch.status = BatchStatus.held
            batch.hold_reason = (f"test accuracy fell {drop:.2f} points (parent {parent.metrics['TA']:.2f}, "
                                 f"new {metrics['TA']:.2f}); the gate allows {settings.quality_gate_max_ta_drop}")
            # The requests stay pending (and attached to the held batch) until an admin decides.
            session.execute(update(ForgetRequest).where(ForgetRequest.batch_id == batch.id)
                            .values(status=RequestStatus.pending))
            append_audit(session, actor=actor, action="batch.held", object_type="batch", object_id=str(batch.id),
                         details={"version_id": version.id, "reason": batch.hold_reason})
            log.warning("batch %s held for review: %s", batch.id, batch.hold_reason)
            return None
        deploy_version(session, batch, model, version, forget_ids, actor)
        return version.id


def record_failure(engine: Engine, settings: Settings, claimed: ClaimedBatch, error: BaseException) -> None:
    """A run raised: free the lease after a backoff, so the scheduler retries from the same parent."""
    with transaction(engine) as session:
        batch = session.get(Batch, claimed.batch_id, with_for_update=True)
        if batch.status != BatchStatus.running or batch.lease_owner != WORKER_ID:
            return
        backoff = settings.retry_backoff_seconds * 2 ** (batch.attempts - 1)
        batch.error = f"{type(error).__name__}: {error}"
        batch.lease_owner = None
        batch.lease_expires_at = utcnow() + timedelta(seconds=backoff)
        append_audit(session, actor=f"worker:{WORKER_ID}", action="batch.attempt_failed", object_type="batch",
                     object_id=str(batch.id),
                     details={"attempt": batch.attempts, "error": batch.error, "retry_in_seconds": backoff})


def prune_artifacts(engine: Engine, settings: Settings, model_name: str) -> list[int]:
    """Delete the files of versions that still carry forgotten samples, after the retention time.

    A version made before a sample was forgotten still holds what it learned from it; once the
    deployment has forgotten it (and the retention time for audit evidence has passed) the file
    goes. The row and its lineage stay. Returns the pruned version ids.
    """
    cutoff = utcnow() - timedelta(hours=settings.artifact_retention_hours)
    pruned = []
    with transaction(engine) as session:
        model = session.get(Model, model_name)
        forgotten_at = dict(session.execute(
            select(Sample.id, Sample.forgotten_at)
            .where(Sample.dataset == model.dataset, Sample.status == SampleStatus.forgotten)
        ).all())
        versions = session.scalars(select(ModelVersion).where(
            ModelVersion.model_name == model_name, ModelVersion.artifact_deleted_at.is_(None),
            ModelVersion.id != model.deployed_version_id)).all()
        for version in versions:
            still_carried = [forgotten_at[i] for i in forgotten_at.keys() - set(version.excluded_sample_ids)]
            if still_carried and min(as_utc(t) for t in still_carried) <= cutoff:
                Path(version.artifact_path).unlink(missing_ok=True)
                version.artifact_deleted_at = utcnow()
                pruned.append(version.id)
        if pruned:
            append_audit(session, actor=f"worker:{WORKER_ID}", action="artifacts.deleted", object_type="model",
                         object_id=model_name, details={"version_ids": pruned})
    return pruned


def train_reference(engine: Engine, settings: Settings, model_name: str, reference_request_id: int | None = None,
                    progress: bool = False) -> int | None:
    """Train a retrain reference from scratch on the samples still active. Returns its version id.

    With a reference request, the request is closed in the transaction that records the reference;
    a request already closed (a duplicate delivery) trains nothing and returns None.
    """
    with transaction(engine) as session:
        model = session.get(Model, model_name)
        if model is None:
            raise ValueError(f"unknown model {model_name!r}")
        if reference_request_id is not None:
            request = session.get(ReferenceRequest, reference_request_id)
            if request is None or request.finished_at is not None:
                log.info("reference request %s is closed already: nothing to train", reference_request_id)
                return None
        active_indices = session.scalars(
            select(Sample.dataset_index)
            .where(Sample.dataset == model.dataset, Sample.status == SampleStatus.active)
            .order_by(Sample.dataset_index)
        ).all()
        excluded = session.scalars(
            select(Sample.id).where(Sample.dataset == model.dataset, Sample.status == SampleStatus.forgotten)
        ).all()
        spec = qf.ModelSpec.from_dict(model.spec)
    data = load_data(spec)
    retain = data.train.subset(active_indices)
    checkpoint = None if reference_request_id is None else reference_checkpoint(
        settings, reference_request_id, spec, active_indices)
    reference = qf.retrain_reference(spec, retain, device=settings.torch_device, progress=progress,
                                     checkpoint=checkpoint, checkpoint_every_s=settings.checkpoint_every_seconds)
    path, sha256 = qf.save_artifact(reference, artifact_spec(spec), Path(settings.model_store))
    with transaction(engine) as session:
        version = ModelVersion(
            model_name=model_name,
            kind=VersionKind.reference,
            method="retrain",
            config=spec.to_dict(),
            metrics={"RA": qf.accuracy(reference, retain, settings.torch_device),
                     "TA": qf.accuracy(reference, data.test, settings.torch_device)},
            sha256=sha256,
            artifact_path=str(path),
            excluded_sample_ids=sorted(excluded),
        )
        session.add(version)
        session.flush()
        details = {"model": model_name, "excluded_samples": len(excluded),
                   "retain_samples": len(active_indices), "sha256": sha256}
        if reference_request_id is not None:
            request = session.get(ReferenceRequest, reference_request_id, with_for_update=True)
            request.reference_version_id, request.finished_at, request.error = version.id, utcnow(), None
            details["reference_request_id"] = reference_request_id
        append_audit(session, actor=f"worker:{WORKER_ID}", action="reference.trained",
                     object_type="model_version", object_id=str(version.id), details=details)
        version_id = version.id
    if reference_request_id is not None:  # others of the request's, for a retain set since changed
        drop_reference_checkpoints(settings, reference_request_id)
    return version_id


def reference_checkpoint(settings: Settings, reference_request_id: int, spec: qf.ModelSpec,
                         active_indices: list[int]) -> Path:
    """Where a request's reference training keeps its checkpoint: named by the request and the exact
    retain set, so that a retried or redelivered task resumes, and one that finds more samples
    forgotten since starts over (a reference must never have trained on them)."""
    trained_on = json.dumps([spec.to_dict(), active_indices], sort_keys=True).encode()
    return (Path(settings.model_store) / "checkpoints"
            / f"reference-{reference_request_id}-{hashlib.sha256(trained_on).hexdigest()[:16]}.pt")


def drop_reference_checkpoints(settings: Settings, reference_request_id: int) -> None:
    """A closed request's checkpoints: they may hold samples forgotten since, and nothing resumes them."""
    for path in (Path(settings.model_store) / "checkpoints").glob(f"reference-{reference_request_id}-*.pt"):
        path.unlink(missing_ok=True)


def record_reference_failure(engine: Engine, settings: Settings, reference_request_id: int,
                             error: BaseException) -> None:
    """A reference run raised: the error goes on the request, which stays open (the scheduler sends
    it again after the redelivery time) until it has failed QFORGET_REFERENCE_MAX_ATTEMPTS times;
    then it is closed without a reference ("reference.abandoned")."""
    with transaction(engine) as session:
        request = session.get(ReferenceRequest, reference_request_id, with_for_update=True)
        if request is None or request.finished_at is not None:
            return
        request.error = f"{type(error).__name__}: {error}"
        request.failed_attempts += 1
        abandoned = request.failed_attempts >= settings.reference_max_attempts
        if abandoned:
            request.finished_at = utcnow()
            drop_reference_checkpoints(settings, reference_request_id)
        append_audit(session, actor=f"worker:{WORKER_ID}",
                     action="reference.abandoned" if abandoned else "reference.failed",
                     object_type="model", object_id=request.model_name,
                     details={"reference_request_id": reference_request_id, "error": request.error,
                              "failed_attempts": request.failed_attempts})


def _audit_splits(session, model: Model, forgotten_ids) -> tuple[list[tuple[int, int]], list[int]]:
    """(sample id, dataset index) of the forget split (the given forgotten samples, in the split's
    order) and the dataset indices of the retain split."""
    forget_samples = _forget_samples(session, forgotten_ids)
    retain_indices = session.scalars(
        select(Sample.dataset_index)
        .where(Sample.dataset == model.dataset, Sample.status == SampleStatus.active)
        .order_by(Sample.dataset_index)
    ).all()
    return forget_samples, retain_indices


def _forget_samples(session, forgotten_ids) -> list[tuple[int, int]]:
    """(sample id, dataset index) of the given samples, in the forget split's order."""
    return [tuple(row) for row in session.execute(
        select(Sample.id, Sample.dataset_index).where(Sample.id.in_(forgotten_ids)).order_by(Sample.dataset_index)
    )]


def _evaluate_artifact(settings: Settings, spec: qf.ModelSpec, artifact_path: str, sha256: str,
                       forget_indices: list[int], retain_indices: list[int]) -> dict:
    data = load_data(spec)
    network, _ = qf.load_artifact(Path(artifact_path), sha256, device=settings.torch_device)
    forget, retain = data.train.subset(forget_indices), data.train.subset(retain_indices)
    return qf.evaluate(network, forget, retain, data.test, device=settings.torch_device)


def evaluate_on_deployment_splits(engine: Engine, settings: Settings, model_name: str, version_id: int) -> dict:
    """FA, RA, TA, MIA of any version on the splits the deployed version is audited on."""
    with transaction(engine) as session:
        model = session.get(Model, model_name)
        deployed = session.get(ModelVersion, model.deployed_version_id)
        version = session.get(ModelVersion, version_id)
        forget_samples, retain_indices = _audit_splits(session, model, deployed.excluded_sample_ids)
    forget_indices = [index for _, index in forget_samples]
    return _evaluate_artifact(settings, qf.ModelSpec.from_dict(model.spec), version.artifact_path, version.sha256,
                              forget_indices, retain_indices)


def evaluate_deployment(engine: Engine, settings: Settings, model_name: str) -> int | None:
    """Evaluate the deployed version against the newest reference that excludes the same samples.

    Returns the evaluation id, or None when there is nothing forgotten yet or no such reference
    (the audit endpoint then says so).
    """
    with transaction(engine) as session:
        model = session.get(Model, model_name)
        deployed = session.get(ModelVersion, model.deployed_version_id)
        excluded = set(deployed.excluded_sample_ids)
        if not excluded:
            return None
        references = session.scalars(
            select(ModelVersion)
            .where(ModelVersion.model_name == model_name, ModelVersion.kind == VersionKind.reference)
            .order_by(ModelVersion.id.desc())
        ).all()
        reference = next((r for r in references if set(r.excluded_sample_ids) == excluded), None)
        if reference is None:
            return None
        forget_samples, retain_indices = _audit_splits(session, model, excluded)
        forget_sample_ids = [sample_id for sample_id, _ in forget_samples]
        forget_indices = [index for _, index in forget_samples]
        spec = qf.ModelSpec.from_dict(model.spec)
    data = load_data(spec)
    forget, retain = data.train.subset(forget_indices), data.train.subset(retain_indices)
    assessments = {}
    for version in (deployed, reference):
        network, _ = qf.load_artifact(Path(version.artifact_path), version.sha256, device=settings.torch_device)
        assessments[version.id] = assess_samples(network, forget, retain, data.test, settings.torch_device)
    with transaction(engine) as session:
        evaluation = Evaluation(
            version_id=deployed.id,
            reference_id=reference.id,
            metrics=assessments[deployed.id].metrics,
            reference_metrics=assessments[reference.id].metrics,
            gaps=qf.gaps(assessments[deployed.id].metrics, assessments[reference.id].metrics),
            forget_count=len(forget_indices),
            retain_count=len(retain_indices),
            test_count=len(data.test),
            score_histograms={
                "score": "per-sample loss, -ln p(true label)",
                "bin_edges": SCORE_BIN_EDGES,
                **{role: {"forget": score_histogram(assessments[version.id].forget_loss),
                          "test": score_histogram(assessments[version.id].test_loss)}
                   for role, version in (("version", deployed), ("reference", reference))},
            },
        )
        session.add(evaluation)
        session.flush()
        for version in (deployed, reference):
            record_sample_scores(session, version.id, forget_sample_ids, assessments[version.id])
        append_audit(session, actor=f"worker:{WORKER_ID}", action="evaluation.recorded",
                     object_type="model_version", object_id=str(evaluation.version_id),
                     details={"evaluation_id": evaluation.id, "reference_id": evaluation.reference_id,
                              "gaps": evaluation.gaps})
        return evaluation.id
