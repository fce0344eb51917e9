"""Reads of forget requests, their samples and their subjects."""

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Row, bindparam, func, select
from sqlalchemy.orm import Session

from service.core.models import (
    ForgetRequest,
    ForgetRequestSample,
    Model,
    RequestStatus,
    Sample,
    SampleStatus,
    Subject,
)


@dataclass(frozen=True)
class FiledRequest:
    """A forget request and the samples it asks to forget."""

    request: ForgetRequest | Row  # a row, with the same attributes, where it was only read
    sample_ids: list[int]  # the samples it asks to forget, ascending

    @property
    def sample_count(self) -> int:
        return len(self.sample_ids)


@dataclass(frozen=True)
class SubjectRecord:
    """A subject with its samples (by id) and its forget requests (newest first)."""

    subject: Subject
    samples: list[Sample]
    requests: list[FiledRequest]

    @property
    def active_sample_count(self) -> int:
        return sum(sample.status == SampleStatus.active for sample in self.samples)

    @property
    def forgotten_sample_count(self) -> int:
        return sum(sample.status == SampleStatus.forgotten for sample in self.samples)


_REQUESTS_BY_ID = (
    select(ForgetRequest.__table__, ForgetRequestSample.sample_id)
    .outerjoin(ForgetRequestSample, ForgetRequestSample.request_id == ForgetRequest.id)
    .where(ForgetRequest.id.in_(bindparam("request_ids", expanding=True)))
    .order_by(ForgetRequest.id, ForgetRequestSample.sample_id)
)
_NEWEST_FIRST = (ForgetRequest.received_at.desc(), ForgetRequest.id.desc())


def requests_with_sample_ids(session: Session, request_ids: set[str]) -> dict[str, FiledRequest]:
    """{id: the request (a row of its columns, read-only) and its sample ids (ascending)} of those
    of `request_ids` that exist, in one statement."""
    found: dict[str, FiledRequest] = {}
    for row in session.connection().execute(_REQUESTS_BY_ID, {"request_ids": sorted(request_ids)}):
        if row.id not in found:
            found[row.id] = FiledRequest(row, [])
        if row.sample_id is not None:
            found[row.id].sample_ids.append(row.sample_id)
    return found


def find_request(session: Session, request_id: str) -> ForgetRequest | None:
    return session.get(ForgetRequest, request_id)


def requests_page(
    session: Session,
    *,
    status: RequestStatus | None = None,
    subject_id: str | None = None,
    model_name: str | None = None,
    received_after: datetime | None = None,
    received_before: datetime | None = None,
    limit: int,
    offset: int,
) -> tuple[list[FiledRequest], int]:
    """One page of the requests that match every filter given, newest first, with their sample
    ids; and how many match in all. `received_after` is inclusive, `received_before` exclusive."""
    conditions = []
    if status is not None:
        conditions.append(ForgetRequest.status == status)
    if subject_id is not None:
        conditions.append(ForgetRequest.subject_id == subject_id)
    if model_name is not None:
        conditions.append(ForgetRequest.model_name == model_name)
    if received_after is not None:
        conditions.append(ForgetRequest.received_at >= received_after)
    if received_before is not None:
        conditions.append(ForgetRequest.received_at < received_before)
    count = session.scalar(select(func.count()).select_from(ForgetRequest).where(*conditions))
    requests = session.scalars(
        select(ForgetRequest).where(*conditions).order_by(*_NEWEST_FIRST).limit(limit).offset(offset)
    ).all()
    return _with_sample_ids(session, requests), count


def find_subject(session: Session, subject_id: str, *, model_name: str | None = None) -> SubjectRecord | None:
    """The subject with its samples and forget requests, or None. With `model_name`: only that
    model's requests and the samples of its data set (none when no such model exists)."""
    subject = session.get(Subject, subject_id)
    if subject is None:
        return None
    samples = select(Sample).where(Sample.subject_id == subject_id).order_by(Sample.id)
    requests = select(ForgetRequest).where(ForgetRequest.subject_id == subject_id).order_by(*_NEWEST_FIRST)
    if model_name is not None:
        dataset = session.scalar(select(Model.dataset).where(Model.name == model_name))
        samples = samples.where(Sample.dataset == dataset)
        requests = requests.where(ForgetRequest.model_name == model_name)
    return SubjectRecord(
        subject, list(session.scalars(samples)), _with_sample_ids(session, session.scalars(requests).all())
    )


def _with_sample_ids(session: Session, requests: list[ForgetRequest]) -> list[FiledRequest]:
    sample_ids = sample_ids_of_requests(session, [request.id for request in requests])
    return [FiledRequest(request, sample_ids[request.id]) for request in requests]


def sample_ids_of_requests(session: Session, request_ids: list[str]) -> dict[str, list[int]]:
    """{request id: its sample ids, ascending} for many requests, in one statement."""
    by_request: dict[str, list[int]] = {request_id: [] for request_id in request_ids}
    if request_ids:
        rows = session.execute(
            select(ForgetRequestSample.request_id, ForgetRequestSample.sample_id)
            .where(ForgetRequestSample.request_id.in_(request_ids))
            .order_by(ForgetRequestSample.request_id, ForgetRequestSample.sample_id)
        )
        for request_id, sample_id in rows:
            by_request[request_id].append(sample_id)
    return by_request
