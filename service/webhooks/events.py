"""The data of the events the service sends itself, built where their change happens: the intake
(request.received), the state machine (request.completed, request.failed, request.withdrawn,
request.extended) and the erasure (request.erased). Each builder returns at once, reading nothing,
when no endpoint is configured.

Only request.erased names the subject (the data owner needs it to delete its records); the others
name the request, whose id the filer got in the 202 of POST /forget-requests.
"""

from datetime import datetime

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from service.core.models import (
    Batch,
    ForgetRequest,
    ForgetRequestPart,
    ForgetRequestSample,
    Sample,
    SampleScore,
    as_utc,
)
from service.requests.queries import FiledRequest
from service.webhooks import outbox


def received(session: Session, filed: list[FiledRequest]) -> None:
    """request.received for each request filed (one insert for all of them)."""
    if not filed or not outbox.enabled(session):
        return
    outbox.emit_many(session, [
        ("request.received", {
            "request_id": f.request.id,
            "model": f.request.model_name,
            "parts": [part.model_name for part in f.parts],
            "sample_count": f.sample_count,
            "received_at": _iso(f.request.received_at),
            "due_at": _iso(f.request.due_at),
        })
        for f in filed
    ])


def completed(session: Session, request_ids: list[str], completed_at: datetime) -> None:
    """request.completed for each request (completed at `completed_at`), with a summary of the
    evidence per part: the version that forgot the samples, and the accuracy and membership-attack
    share on them of the version before and after, where the worker recorded figures
    (GET /forget-requests/{id}/evidence has the whole evidence)."""
    if not request_ids or not outbox.enabled(session):
        return
    parts = session.execute(
        select(ForgetRequestPart.request_id, ForgetRequestPart.model_name, ForgetRequestPart.completed_version_id,
               ForgetRequestPart.completed_at, Batch.parent_version_id)
        .join(Batch, Batch.id == ForgetRequestPart.batch_id)
        .where(ForgetRequestPart.request_id.in_(request_ids))
        .order_by(ForgetRequestPart.request_id, ForgetRequestPart.model_name)
    ).all()
    figures = _figures(session, request_ids, {v for p in parts for v in (p.completed_version_id, p.parent_version_id)})
    by_request: dict[str, list[dict]] = {request_id: [] for request_id in request_ids}
    for part in parts:
        by_request[part.request_id].append({
            "model": part.model_name,
            "version_id": part.completed_version_id,
            "parent_version_id": part.parent_version_id,
            "completed_at": _iso(part.completed_at),
            "before": figures.get((part.request_id, part.parent_version_id)),
            "after": figures.get((part.request_id, part.completed_version_id)),
        })
    outbox.emit_many(session, [
        ("request.completed", {"request_id": request_id, "completed_at": _iso(completed_at),
                               "parts": by_request[request_id]})
        for request_id in request_ids
    ])


def failed(session: Session, batch: Batch, request_ids: list[str], error: str) -> None:
    """request.failed for each request of a batch that gave up: its part for the batch's model is
    pending again, with the error, and the next batch of the model claims it."""
    if not request_ids or not outbox.enabled(session):
        return
    outbox.emit_many(session, [
        ("request.failed", {"request_id": request_id, "model": batch.model_name, "batch_id": batch.id,
                            "error": error, "part_status": "pending"})
        for request_id in request_ids
    ])


def withdrawn(session: Session, request: ForgetRequest) -> None:
    """request.withdrawn: it and its parts are withdrawn; no batch takes them."""
    if outbox.enabled(session):
        outbox.emit(session, "request.withdrawn", {"request_id": request.id,
                                                   "withdrawn_at": _iso(request.withdrawn_at)})


def extended(session: Session, request: ForgetRequest) -> None:
    """request.extended: the deadline before and after its one extension."""
    if outbox.enabled(session):
        outbox.emit(session, "request.extended", {"request_id": request.id, "extended_at": _iso(request.extended_at),
                                                  "original_due_at": _iso(request.original_due_at),
                                                  "due_at": _iso(request.due_at)})


def erased(session: Session, request: ForgetRequest, subject_id: str, sample_ids: list[int]) -> None:
    """request.erased: the service erased its copies of these samples; the data owner is to delete
    its own records of them, named as the owner knows them (data set and position), with the subject.
    Nothing when none was erased (a model outside the request's scope still holds them all)."""
    if not sample_ids or not outbox.enabled(session):
        return
    samples = session.execute(select(Sample.dataset, Sample.dataset_index).where(Sample.id.in_(sample_ids))
                              .order_by(Sample.dataset, Sample.dataset_index)).all()
    outbox.emit(session, "request.erased", {
        "request_id": request.id, "subject_id": subject_id, "erased_at": _iso(request.erased_at),
        "samples": [{"dataset": dataset, "dataset_index": index} for dataset, index in samples],
    })


def _figures(session: Session, request_ids: list[str], version_ids: set[int]) -> dict[tuple[str, int], dict]:
    """{(request, version): its sample count, forget accuracy and member share (percent) on the
    request's samples that have figures}, in one statement."""
    rows = session.execute(
        select(ForgetRequestSample.request_id, SampleScore.version_id, func.count(),
               func.sum(case((SampleScore.correct, 1), else_=0)), func.sum(case((SampleScore.member, 1), else_=0)))
        .join(SampleScore, SampleScore.sample_id == ForgetRequestSample.sample_id)
        .where(ForgetRequestSample.request_id.in_(request_ids), SampleScore.version_id.in_(version_ids))
        .group_by(ForgetRequestSample.request_id, SampleScore.version_id)
    ).all()
    return {
        (request_id, version_id): {"version_id": version_id, "sample_count": count,
                                   "forget_accuracy": round(100.0 * correct / count, 2),
                                   "member_share": round(100.0 * member / count, 2)}
        for request_id, version_id, count, correct, member in rows
    }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else as_utc(moment).isoformat()
