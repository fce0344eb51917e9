"""Claiming batches and holding their leases: the database decides who runs what.

Claiming locks the model row (FOR UPDATE SKIP LOCKED on PostgreSQL; SQLite serialises every
transaction) and creates at most one `running` batch per model (a partial unique index: docs/design.md,
invariant 3). The running worker renews the batch's lease; a batch whose lease expired is taken over
and run again from the same parent version (invariant 7), and only the lease holder may record its
result, so a batch is never applied twice.
"""

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Engine, select, update

from service.core.audit_log import append_audit
from service.core.db import transaction
from service.core.models import Batch, BatchStatus, ForgetRequest, ForgetRequestPart, Model, as_utc, utcnow
from service.core.settings import Settings
from service.requests import lifecycle
from workers.runtime import WORKER_ID

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClaimedBatch:
    batch_id: int
    model_name: str
    parent_version_id: int


def claim_batch(engine: Engine, settings: Settings, model_name: str) -> ClaimedBatch | None:
    """Claim every pending part of the model's requests, or take over a batch whose lease expired."""
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
            select(ForgetRequestPart)
            .join(ForgetRequest, ForgetRequest.id == ForgetRequestPart.request_id)
            .where(ForgetRequestPart.model_name == model_name,
                   ForgetRequestPart.status.in_(lifecycle.CLAIMABLE_STATUSES))
            .order_by(ForgetRequest.received_at)
            .with_for_update(of=ForgetRequestPart, skip_locked=True)
        ).all()
        if not pending:
            return None
        batch = lifecycle.claim(session, pending, model_name, model.deployed_version_id, WORKER_ID, lease_until,
                                actor=f"worker:{WORKER_ID}")
        return ClaimedBatch(batch.id, model_name, batch.parent_version_id)


def _take_over(session, settings: Settings, batch: Batch, lease_until) -> ClaimedBatch | None:
    batch.attempts += 1
    if batch.attempts > settings.max_attempts:
        # Never silently dropped: the requests go back to pending with the error recorded.
        error = f"batch {batch.id} abandoned after {settings.max_attempts} attempts: {batch.error or 'worker lost'}"
        lifecycle.give_up(session, batch, error, actor=f"worker:{WORKER_ID}")
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
