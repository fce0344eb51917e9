"""The life of a forget request, of its parts and of the batch that carries a part: every status
change is here.

    part      pending --claim--> batched --complete--> completed
                 ^                  |
                 +--- hold, discard, give up

    request   the sum of its parts: completed when every part is, batched while any part is
              batched or some are completed, else pending

    batch     running --complete--> completed
              running --hold--> held --complete (an admin approves)--> completed
                                held --discard--> discarded
              running --give up (last attempt lost or failed)--> failed

A request is filed `pending` with a pending part per model (service.requests.intake checks it
before anything is written). A batch claims pending parts of one model. A held batch keeps its
parts attached, pending, until an admin decides; discarding or giving up detaches them, so the next
batch claims them again. Each transition checks the current state, changes it, settles the
requests' statuses, appends its audit entries and records its webhook events (service.webhooks),
inside the caller's transaction.
"""

from datetime import datetime

from sqlalchemy import case, exists, select, update
from sqlalchemy.orm import Session

from service.core.audit_log import append_audit
from service.core.models import (
    Batch,
    BatchStatus,
    ForgetRequest,
    ForgetRequestPart,
    ModelVersion,
    RequestStatus,
    utcnow,
)
from service.webhooks import events as webhook_events

FILED = RequestStatus.pending
# A sample in a part of one of these is already on its way to being forgotten by the part's model.
OPEN_STATUSES = (RequestStatus.pending, RequestStatus.batched)


class TransitionRefused(RuntimeError):
    """A status change asked of a batch that is not in the state it starts from."""


def _require(batch: Batch, *expected: BatchStatus) -> None:
    if batch.status not in expected:
        names = " or ".join(status.value for status in expected)
        raise TransitionRefused(f"batch {batch.id} is {batch.status.value}, not {names}")


def claim(session: Session, parts: list[ForgetRequestPart], model_name: str, parent_version_id: int,
          lease_owner: str, lease_until: datetime, actor: str) -> Batch:
    """A new running batch of the given pending parts of one model (the caller locked them)."""
    if any(part.status != RequestStatus.pending or part.model_name != model_name for part in parts):
        raise TransitionRefused(f"only pending parts of model {model_name} can be claimed")
    batch = Batch(model_name=model_name, status=BatchStatus.running, parent_version_id=parent_version_id,
                  lease_owner=lease_owner, lease_expires_at=lease_until)
    session.add(batch)
    session.flush()
    for part in parts:
        part.status = RequestStatus.batched
        part.batch_id = batch.id
    session.flush()
    request_ids = sorted({part.request_id for part in parts})
    _settle_requests(session, request_ids, now=None)
    append_audit(session, actor=actor, action="batch.claimed", object_type="batch", object_id=str(batch.id),
                 details={"model": model_name, "parent_version_id": parent_version_id, "requests": request_ids})
    return batch


def hold(session: Session, batch: Batch, version: ModelVersion, reason: str, actor: str) -> None:
    """The quality gate refused the batch's version: it waits for an admin, its parts pending."""
    _require(batch, BatchStatus.running)
    batch.status = BatchStatus.held
    batch.hold_reason = reason
    session.execute(update(ForgetRequestPart).where(ForgetRequestPart.batch_id == batch.id)
                    .values(status=RequestStatus.pending))
    _settle_requests(session, _request_ids(session, batch), now=None)
    append_audit(session, actor=actor, action="batch.held", object_type="batch", object_id=str(batch.id),
                 details={"version_id": version.id, "reason": reason})


def complete(session: Session, batch: Batch, version: ModelVersion, actor: str, now: datetime) -> None:
    """The batch's version was deployed at `now`: the batch and its parts are done then, and so is
    each request whose every part is."""
    _require(batch, BatchStatus.running, BatchStatus.held)
    request_ids = _request_ids(session, batch)
    session.execute(
        update(ForgetRequestPart)
        .where(ForgetRequestPart.batch_id == batch.id)
        .values(status=RequestStatus.completed, completed_version_id=version.id, completed_at=now, error=None)
    )
    batch.status = BatchStatus.completed
    batch.finished_at = now
    completed = _settle_requests(session, request_ids, now=now)
    webhook_events.completed(session, completed, now)
    for request_id in request_ids:
        append_audit(session, actor=actor, action="request.part_completed", object_type="forget_request",
                     object_id=request_id,
                     details={"model": batch.model_name, "version_id": version.id, "batch_id": batch.id})
    for request_id in completed:
        append_audit(session, actor=actor, action="request.completed", object_type="forget_request",
                     object_id=request_id, details={})
    append_audit(session, actor=actor, action="batch.completed", object_type="batch",
                 object_id=str(batch.id), details={"version_id": version.id, "requests": len(request_ids)})


def discard(session: Session, batch: Batch, actor: str, new_config: dict | None) -> None:
    """An admin refused a held batch: its parts go back to pending, free for the next batch."""
    _require(batch, BatchStatus.held)
    batch.status = BatchStatus.discarded
    batch.finished_at = utcnow()
    _release_parts(session, batch, error=None)
    append_audit(session, actor=actor, action="batch.discarded", object_type="batch",
                 object_id=str(batch.id), details={"new_config": new_config})


def give_up(session: Session, batch: Batch, error: str, actor: str) -> None:
    """The last attempt was lost or failed: the batch fails, its parts go back to pending with the
    error, never silently dropped."""
    _require(batch, BatchStatus.running)
    batch.status = BatchStatus.failed
    batch.finished_at = utcnow()
    batch.error = error
    request_ids = _release_parts(session, batch, error=error)
    webhook_events.failed(session, batch, request_ids, error)
    append_audit(session, actor=actor, action="batch.failed", object_type="batch", object_id=str(batch.id),
                 details={"error": error})


def _release_parts(session: Session, batch: Batch, error: str | None) -> list[str]:
    """Detach the batch's parts, pending again; returns their requests' ids."""
    request_ids = _request_ids(session, batch)
    values = {"status": RequestStatus.pending, "batch_id": None}
    if error is not None:
        values["error"] = error
    session.execute(update(ForgetRequestPart).where(ForgetRequestPart.batch_id == batch.id).values(**values))
    _settle_requests(session, request_ids, now=None)
    return request_ids


def _request_ids(session: Session, batch: Batch) -> list[str]:
    return list(session.scalars(
        select(ForgetRequestPart.request_id).where(ForgetRequestPart.batch_id == batch.id)
        .order_by(ForgetRequestPart.request_id)
    ))


def _settle_requests(session: Session, request_ids: list[str], now: datetime | None) -> list[str]:
    """Set each request's status from its parts'; returns those that became completed (at `now`)."""
    if not request_ids:
        return []
    was_completed = set(session.scalars(select(ForgetRequest.id).where(
        ForgetRequest.id.in_(request_ids), ForgetRequest.status == RequestStatus.completed)))

    def parts_with(*statuses):
        return exists().where(ForgetRequestPart.request_id == ForgetRequest.id, ForgetRequestPart.status.in_(statuses))

    status = case(
        (~parts_with(RequestStatus.pending, RequestStatus.batched), RequestStatus.completed.value),
        (parts_with(RequestStatus.batched) | parts_with(RequestStatus.completed), RequestStatus.batched.value),
        else_=RequestStatus.pending.value,
    )
    session.execute(update(ForgetRequest).where(ForgetRequest.id.in_(request_ids))
                    .values(status=status).execution_options(synchronize_session=False))
    completed = [request_id for request_id in session.scalars(select(ForgetRequest.id).where(
        ForgetRequest.id.in_(request_ids), ForgetRequest.status == RequestStatus.completed,
        ForgetRequest.completed_at.is_(None))) if request_id not in was_completed]
    if completed:
        session.execute(update(ForgetRequest).where(ForgetRequest.id.in_(completed))
                        .values(completed_at=now).execution_options(synchronize_session=False))
    return completed
