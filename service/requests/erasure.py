"""Erasing what the service holds of a completed request's samples: the database side.

A request completed when every model it names forgot its samples. Within the erasure window
(QFORGET_ERASURE_WINDOW_HOURS after completion, never later than the due date) the worker's
erasure task (workers/erasure.py) then:

1. freezes each part's evidence (the figures need the samples; afterwards nothing can recompute
   them) and sets the tombstone (`samples.erased_at`) of each of the request's samples that no
   model holds any more, in one transaction: from its commit no code path reads them;
2. rewrites the decoded-image caches without them and deletes the checkpoints and artifact files
   of versions that still carry them (files: the worker's side);
3. closes the erasure: the request's `erased_at`, an audit entry, and, for a subject all of whose
   samples are erased, the subject's id replaced by its pseudonym, with the stored API responses
   that named it deleted.

A sample another model still holds (the request named one model) keeps its data until that model
forgets it too; the audit entry counts them. Each step can be run again after a crash: the task
repeats what is not recorded as done.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, insert, or_, select, update
from sqlalchemy.orm import Session

from service.api.schemas import EvidencePublic
from service.audit.evidence import request_evidence
from service.core.audit_log import append_audit, audit_key
from service.core.models import ForgetRequest, ForgetRequestSample, IdempotencyRecord, RequestStatus, Sample, Subject
from service.core.pseudonyms import pseudonym
from service.requests.holdings import holders
from service.webhooks import events as webhook_events


def requests_due(session: Session, now: datetime, window: timedelta) -> list[str]:
    """Completed requests whose copies are not erased yet and whose window has passed (or whose
    due date has come), oldest completion first."""
    return list(session.scalars(
        select(ForgetRequest.id)
        .where(ForgetRequest.status == RequestStatus.completed, ForgetRequest.erased_at.is_(None),
               or_(ForgetRequest.completed_at <= now - window, ForgetRequest.due_at <= now))
        .order_by(ForgetRequest.completed_at, ForgetRequest.id)
    ))


@dataclass(frozen=True)
class Tombstoned:
    """What step 1 left for the files: the request's samples no model holds, by data set."""

    sample_ids: dict[str, list[int]]  # data set -> ids of its samples
    still_held: int  # the request's samples a model outside its scope still holds

    @property
    def count(self) -> int:
        return sum(len(ids) for ids in self.sample_ids.values())


def freeze_and_tombstone(session: Session, request: ForgetRequest, now: datetime) -> Tombstoned:
    """Step 1 (the caller holds the request's row lock): freeze every completed part's evidence not
    frozen yet, then tombstone the request's samples that no model holds."""
    for part in request.parts:
        if part.status == RequestStatus.completed and part.evidence_frozen_at is None:
            evidence = EvidencePublic.model_validate(request_evidence(session, request, part))
            part.frozen_evidence = evidence.model_dump(mode="json", exclude={"frozen_at"})
            part.evidence_frozen_at = now
    samples = session.execute(
        select(Sample.id, Sample.dataset)
        .join(ForgetRequestSample, ForgetRequestSample.sample_id == Sample.id)
        .where(ForgetRequestSample.request_id == request.id)
        .order_by(Sample.id)
    ).all()
    held = {sample_id for ids in holders(session, [row.id for row in samples]).values() for sample_id in ids}
    free = [row for row in samples if row.id not in held]
    if free:
        session.execute(update(Sample).where(Sample.id.in_([row.id for row in free]), Sample.erased_at.is_(None))
                        .values(erased_at=now).execution_options(synchronize_session=False))
    by_dataset: dict[str, list[int]] = {}
    for row in free:
        by_dataset.setdefault(row.dataset, []).append(row.id)
    return Tombstoned(by_dataset, still_held=len(held))


def close_erasure(session: Session, request: ForgetRequest, tombstoned: Tombstoned, files: dict, actor: str,
                  now: datetime) -> None:
    """Step 3 (the caller holds the request's row lock): the request's erasure is recorded, and its
    subject's id is replaced by the pseudonym once none of the subject's samples is left."""
    request.erased_at = now
    subject_id = request.subject_id
    webhook_events.erased(session, request, subject_id, [i for ids in tombstoned.sample_ids.values() for i in ids])
    append_audit(session, actor=actor, action="request.erased", object_type="forget_request", object_id=request.id,
                 details={"erased_samples": tombstoned.count, "still_held_samples": tombstoned.still_held,
                          **files})
    if session.get(Subject, subject_id).erased_at is None and not session.scalar(
        select(Sample.id).where(Sample.subject_id == subject_id, Sample.erased_at.is_(None)).limit(1)
    ):
        _replace_subject_id(session, subject_id, now)


def _replace_subject_id(session: Session, subject_id: str, now: datetime) -> None:
    """The subject's row, samples and requests under its pseudonym instead of its id; the stored
    responses of its filings (idempotency records, which repeat the id) are deleted."""
    hashed = pseudonym(audit_key(session), "subject", subject_id)
    created_at = session.get(Subject, subject_id).created_at
    session.execute(insert(Subject).values(id=hashed, created_at=created_at, erased_at=now))
    requests = select(ForgetRequest.id).where(ForgetRequest.subject_id == subject_id)
    session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.forget_request_id.in_(requests)))
    for table in (Sample, ForgetRequest):
        session.execute(update(table).where(table.subject_id == subject_id).values(subject_id=hashed)
                        .execution_options(synchronize_session=False))
    session.execute(delete(Subject).where(Subject.id == subject_id))
    session.expire_all()
