"""A database in mid-operation, for the /metrics, /dashboard and browser tests.

`seed_operations(engine, seed)` adds to the `seed` fixture's model (tests/conftest.py): an
unlearned version (deployed) and a retrain reference, an evaluation of one against the other, two
completed batches, a held one (audit-logged as the quality gate would), a running one with a lease,
and forget requests in several states (one past due). It returns the figures a reader should see.
"""

from dataclasses import dataclass
from datetime import timedelta

from service.core.audit_log import append_audit
from service.core.db import transaction
from service.core.models import (
    Batch,
    BatchStatus,
    Evaluation,
    ForgetRequest,
    ForgottenSample,
    Model,
    ModelVersion,
    RequestStatus,
    VersionKind,
    utcnow,
)
from service.requests.intake import file_forget_request

METRICS = {"FA": 91.5, "RA": 97.25, "TA": 95.0, "MIA": 12.5}
REFERENCE_METRICS = {"FA": 90.0, "RA": 97.0, "TA": 95.5, "MIA": 10.0}
GAPS = {**{key: abs(METRICS[key] - REFERENCE_METRICS[key]) for key in METRICS},
        "AG": sum(abs(METRICS[key] - REFERENCE_METRICS[key]) for key in METRICS) / 4}
HOLD_REASON = "test accuracy fell 9.00 points (parent 96.00, new 87.00); the gate allows 5.0"


@dataclass(frozen=True)
class Operations:
    model: str
    deployed_version_id: int
    reference_id: int
    held_batch_id: int
    batch_durations: tuple[float, ...]  # completed batches, oldest first
    pending_requests: int
    completed_requests: int
    past_due: int
    pending_samples: int
    lease_seconds: float


def _version(session, seed, kind: VersionKind, parent_id: int | None, batch_id: int | None, name: str,
             excluded: list[int]) -> ModelVersion:
    version = ModelVersion(model_name=seed.model, kind=kind, parent_id=parent_id, batch_id=batch_id,
                           method="qmul" if kind == VersionKind.unlearned else "qat", config={}, metrics={"TA": 95.0},
                           sha256=name * 64, artifact_path=f"/nonexistent/{name}.pt", excluded_sample_ids=excluded)
    session.add(version)
    session.flush()
    return version


def seed_operations(engine, seed) -> Operations:
    now = utcnow()
    forgotten = seed.samples["carol"]
    with transaction(engine) as session:
        # Two completed batches, 40 s and then 95 s long; the second deployed version 2.
        durations = (40.0, 95.0)
        deployed = None
        for index, seconds in enumerate(durations):
            started = now - timedelta(hours=3 - index)
            batch = Batch(model_name=seed.model, status=BatchStatus.completed, parent_version_id=seed.version_id,
                          attempts=1, created_at=started, finished_at=started + timedelta(seconds=seconds))
            session.add(batch)
            session.flush()
            append_audit(session, actor="worker:test", action="batch.claimed", object_type="batch",
                         object_id=str(batch.id), details={})
            deployed = _version(session, seed, VersionKind.unlearned, seed.version_id, batch.id, str(index + 1),
                                forgotten)
            batch.result_version_id = deployed.id
            append_audit(session, actor="worker:test", action="batch.completed", object_type="batch",
                         object_id=str(batch.id), details={"version_id": deployed.id})
        session.get(Model, seed.model).deployed_version_id = deployed.id
        reference = _version(session, seed, VersionKind.reference, None, None, "r", forgotten)
        session.add(Evaluation(version_id=deployed.id, reference_id=reference.id, metrics=METRICS,
                               reference_metrics=REFERENCE_METRICS, gaps=GAPS, forget_count=3, retain_count=12,
                               test_count=360, created_at=now - timedelta(minutes=5)))
        completed = file_forget_request(session, subject_id="carol", sample_ids=None, model_name=seed.model,
                                        deadline_days=30, actor="test").request
        # Completed by the second batch: its one part too, and the model no longer holds carol's samples.
        [part] = completed.parts
        part.status, part.batch_id, part.completed_version_id = RequestStatus.completed, batch.id, deployed.id
        completed.status = RequestStatus.completed
        completed.received_at, completed.due_at = now - timedelta(days=3), now + timedelta(days=27)
        completed.completed_at = part.completed_at = now - timedelta(hours=2)
        session.add_all([ForgottenSample(model_name=seed.model, sample_id=sample_id,
                                         forgotten_at=completed.completed_at, version_id=deployed.id)
                         for sample_id in forgotten])

        # A batch the quality gate held, and a running one whose lease has 300 s left.
        held = Batch(model_name=seed.model, status=BatchStatus.held, parent_version_id=deployed.id,
                     hold_reason=HOLD_REASON, created_at=now - timedelta(hours=1))
        session.add(held)
        session.flush()
        for action in ("batch.claimed", "batch.held"):
            append_audit(session, actor="worker:test", action=action, object_type="batch",
                         object_id=str(held.id), details={})
        session.add(Batch(model_name=seed.model, status=BatchStatus.running, parent_version_id=deployed.id,
                          lease_owner="worker-a", lease_expires_at=now + timedelta(seconds=300)))

        # Two pending requests (12 samples), one of them received 35 days ago: past its due date.
        file_forget_request(session, subject_id="alice", sample_ids=None, model_name=seed.model,
                            deadline_days=30, actor="test")
        late = file_forget_request(session, subject_id="bob", sample_ids=None, model_name=seed.model,
                                   deadline_days=30, actor="test").request
        late.received_at, late.due_at = now - timedelta(days=35), now - timedelta(days=5)
        session.flush()
        assert session.get(ForgetRequest, late.id).status == RequestStatus.pending
        return Operations(
            model=seed.model, deployed_version_id=deployed.id, reference_id=reference.id, held_batch_id=held.id,
            batch_durations=durations, pending_requests=2, completed_requests=1, past_due=1,
            pending_samples=len(seed.samples["alice"]) + len(seed.samples["bob"]), lease_seconds=300.0,
        )
