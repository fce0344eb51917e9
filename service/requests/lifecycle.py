"""The life of a forget request and of the batch that carries it: every status change is here.

    request   pending --claim--> batched --complete--> completed
                 ^                  |
                 +--- hold, discard, give up

    batch     running --complete--> completed
              running --hold--> held --complete (an admin approves)--> completed
                                held --discard--> discarded
              running --give up (last attempt lost or failed)--> failed

A request is filed `pending` (service.requests.intake checks it before anything is written). A held
batch keeps its requests attached, pending, until an admin decides; discarding or giving up
detaches them, so the next batch claims them again. Each transition checks the current state,
changes it and appends its audit entry, inside the caller's transaction.
"""

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.core.audit_log import append_audit
from service.core.models import Batch, BatchStatus, ForgetRequest, ModelVersion, RequestStatus, utcnow

FILED = RequestStatus.pending
# A sample in a request of one of these is already on its way to being forgotten.
OPEN_STATUSES = (RequestStatus.pending, RequestStatus.batched)


class TransitionRefused(RuntimeError):
    """A status change asked of a batch that is not in the state it starts from."""


def _require(batch: Batch, *expected: BatchStatus) -> None:
    if batch.status not in expected:
        names = " or ".join(status.value for status in expected)
        raise TransitionRefused(f"batch {batch.id} is {batch.status.value}, not {names}")


def claim(session: Session, requests: list[ForgetRequest], model_name: str, parent_version_id: int,
          lease_owner: str, lease_until: datetime, actor: str) -> Batch:
    """A new running batch of the given pending requests (the caller locked them)."""
    if any(request.status != RequestStatus.pending for request in requests):
        raise TransitionRefused("only pending requests can be claimed")
    batch = Batch(model_name=model_name, status=BatchStatus.running, parent_version_id=parent_version_id,
                  lease_owner=lease_owner, lease_expires_at=lease_until)
    session.add(batch)
    session.flush()
    for request in requests:
        request.status = RequestStatus.batched
        request.batch_id = batch.id
    append_audit(session, actor=actor, action="batch.claimed", object_type="batch", object_id=str(batch.id),
                 details={"model": model_name, "parent_version_id": parent_version_id,
                          "requests": [request.id for request in requests]})
    return batch


def hold(session: Session, batch: Batch, version: ModelVersion, reason: str, actor: str) -> None:
    """The quality gate refused the batch's version: it waits for an admin, its requests pending."""
    _require(batch, BatchStatus.running)
    batch.status = BatchStatus.held
    batch.hold_reason = reason
    session.execute(update(ForgetRequest).where(ForgetRequest.batch_id == batch.id)
                    .values(status=RequestStatus.pending))
    append_audit(session, actor=actor, action="batch.held", object_type="batch", object_id=str(batch.id),
                 details={"version_id": version.id, "reason": reason})


def complete(session: Session, batch: Batch, version: ModelVersion, actor: str, now: datetime) -> None:
    """The batch's version was deployed at `now`: the batch and its requests are done then."""
    _require(batch, BatchStatus.running, BatchStatus.held)
    request_ids = session.scalars(select(ForgetRequest.id).where(ForgetRequest.batch_id == batch.id)).all()
    session.execute(
        update(ForgetRequest)
        .where(ForgetRequest.batch_id == batch.id)
        .values(status=RequestStatus.completed, completed_version_id=version.id, completed_at=now, error=None)
    )
    batch.status = BatchStatus.completed
    batch.finished_at = now
    for request_id in request_ids:
        append_audit(session, actor=actor, action="request.completed", object_type="forget_request",
                     object_id=request_id, details={"version_id": version.id, "batch_id": batch.id})
    append_audit(session, actor=actor, action="batch.completed", object_type="batch",
                 object_id=str(batch.id), details={"version_id": version.id, "requests": len(request_ids)})


def discard(session: Session, batch: Batch, actor: str, new_config: dict | None) -> None:
    """An admin refused a held batch: its requests go back to pending, free for the next batch."""
    _require(batch, BatchStatus.held)
    batch.status = BatchStatus.discarded
    batch.finished_at = utcnow()
    _release_requests(session, batch, error=None)
    append_audit(session, actor=actor, action="batch.discarded", object_type="batch",
                 object_id=str(batch.id), details={"new_config": new_config})


def give_up(session: Session, batch: Batch, error: str, actor: str) -> None:
    """The last attempt was lost or failed: the batch fails, its requests go back to pending with
    the error, never silently dropped."""
    _require(batch, BatchStatus.running)
    batch.status = BatchStatus.failed
    batch.finished_at = utcnow()
    batch.error = error
    _release_requests(session, batch, error=error)
    append_audit(session, actor=actor, action="batch.failed", object_type="batch", object_id=str(batch.id),
                 details={"error": error})


def _release_requests(session: Session, batch: Batch, error: str | None) -> None:
    values = {"status": RequestStatus.pending, "batch_id": None}
    if error is not None:
        values["error"] = error
    session.execute(update(ForgetRequest).where(ForgetRequest.batch_id == batch.id).values(**values))
