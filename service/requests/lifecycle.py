"""The life of a forget request, of its parts and of the batch that carries a part: every status
change is here.

    part      pending --claim--> batched --complete--> completed
                 |   ^                 |
                 |   +--- hold, discard, give up (back to instant when it had its instant stage)
                 +--take effect--> instant --claim--> batched
              pending --withdraw--> withdrawn

    request   the sum of its parts: completed when every part is, batched while any part is
              batched or some are completed, instant when no part is pending and one is instant,
              else pending; withdrawn with its parts
    linked    a request some of whose samples an earlier request's open part covered (see below):
              completed only when its own parts are and no earlier request it shares a sample with
              has a part under way (of a model it goes to); batched while any of these is under
              way; else pending

    batch     running --complete--> completed
              running --hold--> held --complete (an admin approves)--> completed
                                held --discard--> discarded
              running --give up (last attempt lost or failed)--> failed

A request is filed `pending` with a pending part per model that still has samples of it to forget
(service.requests.intake checks it before anything is written). A batch claims pending parts of
one model. A held batch keeps its parts attached, pending, until an admin decides; discarding or
giving up detaches them, so the next batch claims them again. Each transition checks the current
state, changes it, settles the requests' statuses, appends its audit entries and records its
webhook events (service.webhooks), inside the caller's transaction.

Linking: a subject's second request for samples already under way is not run twice. Intake gives
it no part for a (model, sample) an open part already covers and links it to the newest request
whose open part covers one (`linked_request_id`). The request then waits for every earlier request
it shares a sample with, not only the one it names: it is never reported completed while a part
it relies on is still running, whichever request covers which sample. A request with no part of
its own is thus completed when the requests covering it are.

The instant stage (semi-parametric models only, workers/instant.py): `take_effect` records that
the model's deployed version no longer holds a part's samples in its datastore. A pending part
becomes `instant`; a part already batched (claimed before the stage ran) keeps its status and gets
the version too. Either way the batch still unlearns the encoder, and only that completes it.

Two transitions belong to the client: `withdraw` (before any part is in a batch) and `extend`
(the deadline, once, by one or two calendar months: GDPR Art. 12(3)).
"""

import calendar
from datetime import datetime

from sqlalchemy import case, exists, select, update
from sqlalchemy.orm import Session, aliased

from service.core.audit_log import append_audit
from service.core.models import (
    Batch,
    BatchStatus,
    ForgetRequest,
    ForgetRequestPart,
    ForgetRequestSample,
    ModelVersion,
    RequestStatus,
    Sample,
    as_utc,
    utcnow,
)
from service.requests.problems import RequestConflict
from service.webhooks import events as webhook_events

FILED = RequestStatus.pending
# A sample in a part of one of these is already on its way to being forgotten by the part's model.
OPEN_STATUSES = (RequestStatus.pending, RequestStatus.instant, RequestStatus.batched)
# Parts a batch claims: not yet in a batch.
CLAIMABLE_STATUSES = (RequestStatus.pending, RequestStatus.instant)
# The longest reason a withdrawal or an extension may give.
MAX_REASON_LENGTH = 500
# GDPR Art. 12(3): the deadline "may be extended by two further months where necessary".
EXTENSION_MONTHS = (1, 2)


class TransitionRefused(RuntimeError):
    """A status change asked of a batch that is not in the state it starts from."""


def _require(batch: Batch, *expected: BatchStatus) -> None:
    if batch.status not in expected:
        names = " or ".join(status.value for status in expected)
        raise TransitionRefused(f"batch {batch.id} is {batch.status.value}, not {names}")


def claim(session: Session, parts: list[ForgetRequestPart], model_name: str, parent_version_id: int,
          lease_owner: str, lease_until: datetime, actor: str) -> Batch:
    """A new running batch of the given pending parts of one model (the caller locked them)."""
    if any(part.status not in CLAIMABLE_STATUSES or part.model_name != model_name for part in parts):
        raise TransitionRefused(f"only pending or instant parts of model {model_name} can be claimed")
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
                    .values(status=_RELEASED_STATUS))
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


def take_effect(session: Session, parts: list[ForgetRequestPart], version: ModelVersion, actor: str,
                now: datetime) -> None:
    """The instant stage of these parts (of one semi-parametric model, the caller locked them): the
    deployed `version`'s datastore no longer holds their samples, since `now`. Pending parts become
    instant; batched ones keep their status. Each request's audit entry names the version."""
    if any(part.status not in (RequestStatus.pending, RequestStatus.batched) or part.instant_version_id is not None
           or part.model_name != version.model_name for part in parts):
        raise TransitionRefused(f"only pending or batched parts of model {version.model_name} without an "
                                "instant stage can take instant effect")
    for part in parts:
        if part.status == RequestStatus.pending:
            part.status = RequestStatus.instant
        part.instant_version_id = version.id
        part.instant_at = now
    session.flush()
    request_ids = sorted({part.request_id for part in parts})
    _settle_requests(session, request_ids, now=None)
    for request_id in request_ids:
        append_audit(session, actor=actor, action="request.part_instant", object_type="forget_request",
                     object_id=request_id, details={"model": version.model_name, "version_id": version.id})


def withdraw(session: Session, request: ForgetRequest, reason: str, actor: str, now: datetime) -> None:
    """The client withdrew the request at `now`, before any work on it began: it and its parts are
    withdrawn, and no batch claims them.

    Refused (RequestConflict) once it is withdrawn or completed, once a part is in a batch (running,
    held for review or done: the version that forgets its samples exists or is being made), and
    while an open request linked later relies on its parts (`_open_followers`): that one has no
    part for the samples they share, and would never see them forgotten.
    """
    parts = _lock_for_change(session, request)
    if request.status == RequestStatus.withdrawn:
        raise _refused("already_withdrawn", f"request {request.id} was withdrawn at {_when(request.withdrawn_at)}")
    if request.status == RequestStatus.completed:
        raise _refused("request_completed", f"request {request.id} was completed at {_when(request.completed_at)}")
    started = [part.model_name for part in parts if part.status != RequestStatus.pending or part.batch_id is not None]
    if started:
        raise _refused("request_batched", f"request {request.id} can no longer be withdrawn: its parts for "
                                          f"{', '.join(started)} are in a batch, done, or removed from the "
                                          "model's datastore already")
    followers = _open_followers(session, request)
    if followers:
        raise _refused("linked_requests_open", f"requests filed later rely on the parts of request {request.id} "
                       f"for samples they share ({', '.join(followers)}): withdraw them first")
    session.execute(update(ForgetRequestPart).where(ForgetRequestPart.request_id == request.id)
                    .values(status=RequestStatus.withdrawn))
    request.status = RequestStatus.withdrawn
    request.withdrawn_at = now
    request.withdrawal_reason = reason
    webhook_events.withdrawn(session, request)
    # The reason is the client's free text: the audit log, which names no one, records its length only.
    append_audit(session, actor=actor, action="request.withdrawn", object_type="forget_request",
                 object_id=request.id,
                 details={"parts": [part.model_name for part in parts], "reason_length": len(reason)})


def extend(session: Session, request: ForgetRequest, months: int, reason: str, actor: str, now: datetime) -> None:
    """Extend the request's deadline once, at `now`, by `months` calendar months (`add_months`);
    the deadline before is kept as `original_due_at`. Refused (RequestConflict) for a request
    completed or withdrawn, or extended already."""
    if months not in EXTENSION_MONTHS:
        raise ValueError(f"a deadline is extended by one of {EXTENSION_MONTHS} months, not {months}")
    _lock_request(session, request)
    if request.status in (RequestStatus.completed, RequestStatus.withdrawn):
        raise _refused("request_closed", f"request {request.id} is {request.status.value}: its deadline no longer runs")
    if request.original_due_at is not None:
        raise _refused("already_extended", f"request {request.id} was extended at {_when(request.extended_at)} "
                                           f"from {_when(request.original_due_at)}; a deadline is extended once")
    old_due_at = as_utc(request.due_at)
    request.original_due_at = old_due_at
    request.due_at = add_months(old_due_at, months)
    request.extended_at = now
    request.extension_reason = reason
    webhook_events.extended(session, request)
    append_audit(session, actor=actor, action="request.extended", object_type="forget_request", object_id=request.id,
                 details={"old_due_at": old_due_at.isoformat(), "new_due_at": request.due_at.isoformat(),
                          "months": months, "reason_length": len(reason)})


def add_months(moment: datetime, months: int) -> datetime:
    """`moment` that many calendar months later, at the same time of day. A day the month reached
    does not have becomes its last day (31 January plus one month: 28 or 29 February), so an
    extension never reaches into the month after."""
    month_index = moment.month - 1 + months
    year, month = moment.year + month_index // 12, month_index % 12 + 1
    return moment.replace(year=year, month=month, day=min(moment.day, calendar.monthrange(year, month)[1]))


def _release_parts(session: Session, batch: Batch, error: str | None) -> list[str]:
    """Detach the batch's parts, pending (instant, after their instant stage) again; returns their
    requests' ids."""
    request_ids = _request_ids(session, batch)
    values = {"status": _RELEASED_STATUS, "batch_id": None}
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


def _refused(error_type: str, message: str) -> RequestConflict:
    return RequestConflict("request_id", message, error_type=error_type, location="path")


def _when(moment: datetime) -> str:
    return as_utc(moment).isoformat()


def _lock_request(session: Session, request: ForgetRequest) -> None:
    """Read the request again, locked against a concurrent change of it. NO KEY UPDATE: a request
    that intake links to it meanwhile (its foreign key takes KEY SHARE) is not blocked by the lock."""
    session.refresh(request, with_for_update={"key_share": True})


def _lock_for_change(session: Session, request: ForgetRequest) -> list[ForgetRequestPart]:
    """Lock the request's samples (in id order), its parts and the request, and return the parts as
    they are now. The order is intake's and a deployment's (samples, then parts, then requests), so
    none of them can deadlock with a withdrawal.

    A claim skips parts locked here, or holds them until it commits (then they are seen batched);
    intake, which locks the samples it files first, either finishes first (a request linked to this
    one is then seen by `_open_followers`) or sees this one's parts as the withdrawal leaves them.
    """
    session.execute(
        select(Sample.id).where(Sample.id.in_(
            select(ForgetRequestSample.sample_id).where(ForgetRequestSample.request_id == request.id)
        )).order_by(Sample.id).with_for_update()
    )
    parts = list(session.scalars(
        select(ForgetRequestPart).where(ForgetRequestPart.request_id == request.id)
        .order_by(ForgetRequestPart.model_name).with_for_update()
        .execution_options(populate_existing=True)
    ))
    _lock_request(session, request)
    return parts


def _open_followers(session: Session, request: ForgetRequest) -> list[str]:
    """The open linked requests filed after the request (or at the same instant) that share a
    sample with it and go to a model it has a part for: those `_WAITING` makes wait for its parts,
    which may cover samples they have no part for."""
    mine, theirs = aliased(ForgetRequestSample), aliased(ForgetRequestSample)
    models = select(ForgetRequestPart.model_name).where(ForgetRequestPart.request_id == request.id)
    return list(session.scalars(
        select(ForgetRequest.id).distinct()
        .join(theirs, theirs.request_id == ForgetRequest.id)
        .join(mine, mine.sample_id == theirs.sample_id)
        .where(mine.request_id == request.id, ForgetRequest.id != request.id,
               ForgetRequest.received_at >= request.received_at, _LINKED,
               ForgetRequest.status.in_(OPEN_STATUSES),
               ForgetRequest.model_name.is_(None) | ForgetRequest.model_name.in_(models))
        .order_by(ForgetRequest.id)
    ))


# The status a request's parts, and for a linked request the parts it relies on, give it. Built
# once; correlated to the request the UPDATE sets.
_mine = aliased(ForgetRequestSample, name="mine")
_theirs = aliased(ForgetRequestSample, name="theirs")
_earlier = aliased(ForgetRequest, name="earlier")
_earlier_part = aliased(ForgetRequestPart, name="earlier_part")
_LINKED = ForgetRequest.linked_request_id.is_not(None)


def _own_parts(*statuses: RequestStatus):
    return exists().where(ForgetRequestPart.request_id == ForgetRequest.id, ForgetRequestPart.status.in_(statuses))


def _relied_on_parts(statuses: tuple[RequestStatus, ...], *also):
    """A part in one of `statuses`, meeting `also`, of an earlier request (or one filed at the same
    instant: it waits rather than be completed too early) that shares a sample with it, for a model
    it goes to: a part that may be forgetting that sample for it."""
    return _LINKED & exists().where(
        _mine.request_id == ForgetRequest.id, _theirs.sample_id == _mine.sample_id,
        _earlier.id == _theirs.request_id, _earlier.id != ForgetRequest.id,
        _earlier.received_at <= ForgetRequest.received_at,
        _earlier_part.request_id == _earlier.id, _earlier_part.status.in_(statuses),
        ForgetRequest.model_name.is_(None) | (_earlier_part.model_name == ForgetRequest.model_name),
        *also,
    )


# A linked request waits while a part it relies on is under way...
_WAITING = _relied_on_parts(OPEN_STATUSES)
# ... and is under way itself once one of those requests is: a part batched, or some completed while
# others are not. (A request whose parts are all completed or withdrawn is not waited for.)
_EARLIER_UNDER_WAY = _relied_on_parts(
    (RequestStatus.batched, RequestStatus.completed),
    exists().where(ForgetRequestPart.request_id == _earlier.id, ForgetRequestPart.status.in_(OPEN_STATUSES)),
)
_STATUS = case(
    (~_own_parts(*OPEN_STATUSES) & ~_WAITING, RequestStatus.completed.value),
    (_own_parts(RequestStatus.batched, RequestStatus.completed) | _EARLIER_UNDER_WAY, RequestStatus.batched.value),
    (_own_parts(RequestStatus.instant) & ~_own_parts(RequestStatus.pending), RequestStatus.instant.value),
    else_=RequestStatus.pending.value,
)
# Where a part released from a batch goes back to: instant if its samples already left the datastore.
_RELEASED_STATUS = case((ForgetRequestPart.instant_version_id.is_not(None), RequestStatus.instant.value),
                       else_=RequestStatus.pending.value)


def _settle_requests(session: Session, request_ids: list[str], now: datetime | None) -> list[str]:
    """Set the status of each request, and of every open linked request of their subjects (a change
    of theirs may be what it waits for), from the parts; returns those that became completed (at
    `now`). Four or five statements, whatever the number of requests. A withdrawn request stays
    withdrawn."""
    if not request_ids:
        return []
    origin = aliased(ForgetRequest)
    subjects = select(origin.subject_id).where(origin.id.in_(request_ids))
    candidates = session.execute(select(ForgetRequest.id, ForgetRequest.status).where(
        ForgetRequest.status != RequestStatus.withdrawn,
        ForgetRequest.id.in_(request_ids)
        | (_LINKED & ForgetRequest.status.in_(OPEN_STATUSES) & ForgetRequest.subject_id.in_(subjects)),
    )).all()
    settled = sorted(request_id for request_id, _ in candidates)
    was_completed = {request_id for request_id, status in candidates if status == RequestStatus.completed}
    session.execute(update(ForgetRequest).where(ForgetRequest.id.in_(settled))
                    .values(status=_STATUS).execution_options(synchronize_session=False))
    completed = [request_id for request_id in session.scalars(select(ForgetRequest.id).where(
        ForgetRequest.id.in_(settled), ForgetRequest.status == RequestStatus.completed,
        ForgetRequest.completed_at.is_(None))) if request_id not in was_completed]
    if completed:
        session.execute(update(ForgetRequest).where(ForgetRequest.id.in_(completed))
                        .values(completed_at=now).execution_options(synchronize_session=False))
    return completed
