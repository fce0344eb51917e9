"""Reads of forget requests, their parts, their samples and their subjects."""

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Row, bindparam, func, select
from sqlalchemy.orm import Session, selectinload

from service.core.audit_log import audit_key
from service.core.models import (
    Dataset,
    ForgetRequest,
    ForgetRequestPart,
    ForgetRequestSample,
    ForgottenSample,
    Model,
    RequestStatus,
    Sample,
    Subject,
)
from service.core.pseudonyms import pseudonym


@dataclass(frozen=True)
class FiledRequest:
    """A forget request, the samples it asks to forget and its part for each model."""

    request: ForgetRequest | Row  # a row, with the same attributes, where it was only read
    sample_ids: list[int]  # the samples it asks to forget, ascending
    parts: list[ForgetRequestPart | Row] = field(default_factory=list)  # by model name
    # The semi-parametric models among the parts' (filed only): the API wakes their instant stage.
    instant_models: list[str] = field(default_factory=list)

    @property
    def sample_count(self) -> int:
        return len(self.sample_ids)


@dataclass(frozen=True)
class Holding:
    """Whether a model still holds a sample (service.requests.holdings)."""

    model: str
    status: str  # "held" or "forgotten"
    forgotten_at: datetime | None = None
    version_id: int | None = None  # the version that forgot it


@dataclass(frozen=True)
class SampleRecord:
    id: int
    dataset: str
    dataset_index: int
    subject_id: str
    models: list[Holding]  # every model on the data set that learned it, by name


def as_seen_by(filed: FiledRequest, model_name: str | None) -> FiledRequest:
    """The request as a key limited to `model_name` sees it: its own model's part only."""
    if model_name is None:
        return filed
    return FiledRequest(filed.request, filed.sample_ids, [p for p in filed.parts if p.model_name == model_name])


@dataclass(frozen=True)
class SubjectRecord:
    """A subject with its samples (by id), which model holds each, and its forget requests (newest first)."""

    subject: Subject
    samples: list[SampleRecord]
    requests: list[FiledRequest]

    @property
    def held_sample_count(self) -> int:
        return sum(any(h.status == "held" for h in sample.models) for sample in self.samples)

    @property
    def forgotten_sample_count(self) -> int:
        return sum(bool(sample.models) and all(h.status == "forgotten" for h in sample.models)
                   for sample in self.samples)


_REQUESTS_BY_ID = (
    select(ForgetRequest.__table__, ForgetRequestSample.sample_id)
    .outerjoin(ForgetRequestSample, ForgetRequestSample.request_id == ForgetRequest.id)
    .where(ForgetRequest.id.in_(bindparam("request_ids", expanding=True)))
    .order_by(ForgetRequest.id, ForgetRequestSample.sample_id)
)
_PARTS_BY_REQUEST = (
    select(ForgetRequestPart.__table__)
    .where(ForgetRequestPart.request_id.in_(bindparam("request_ids", expanding=True)))
    .order_by(ForgetRequestPart.request_id, ForgetRequestPart.model_name)
)
_NEWEST_FIRST = (ForgetRequest.received_at.desc(), ForgetRequest.id.desc())


def requests_with_sample_ids(session: Session, request_ids: set[str]) -> dict[str, FiledRequest]:
    """{id: the request (a row of its columns, read-only), its sample ids (ascending) and its parts}
    of those of `request_ids` that exist, in two statements."""
    found: dict[str, FiledRequest] = {}
    connection = session.connection()
    for row in connection.execute(_REQUESTS_BY_ID, {"request_ids": sorted(request_ids)}):
        if row.id not in found:
            found[row.id] = FiledRequest(row, [])
        if row.sample_id is not None:
            found[row.id].sample_ids.append(row.sample_id)
    if found:
        for part in connection.execute(_PARTS_BY_REQUEST, {"request_ids": sorted(found)}):
            found[part.request_id].parts.append(part)
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
        conditions.append(ForgetRequest.parts.any(ForgetRequestPart.model_name == model_name))
    if received_after is not None:
        conditions.append(ForgetRequest.received_at >= received_after)
    if received_before is not None:
        conditions.append(ForgetRequest.received_at < received_before)
    count = session.scalar(select(func.count()).select_from(ForgetRequest).where(*conditions))
    requests = session.scalars(
        select(ForgetRequest).where(*conditions).order_by(*_NEWEST_FIRST).limit(limit).offset(offset)
        .options(selectinload(ForgetRequest.parts))
    ).all()
    return _with_sample_ids(session, requests), count


def find_subject(session: Session, subject_id: str, *, model_name: str | None = None) -> SubjectRecord | None:
    """The subject with its samples, which model holds each, and its forget requests, or None. With
    `model_name`: only that model's data set, holdings, requests and parts (none when no such model
    exists)."""
    # An erased subject's row is kept under its pseudonym: found by hashing the id asked for.
    subject = session.get(Subject, subject_id) or session.get(Subject, pseudonym(audit_key(session), "subject",
                                                                                  subject_id))
    if subject is None:
        return None
    subject_id = subject.id
    samples = session.execute(
        select(Sample.id, Sample.dataset, Sample.dataset_index, Sample.subject_id, Dataset.train_size)
        .outerjoin(Dataset, Dataset.name == Sample.dataset)
        .where(Sample.subject_id == subject_id).order_by(Sample.id)
    ).all()
    models = select(Model.name, Model.dataset).where(Model.deployed_version_id.is_not(None)).order_by(Model.name)
    requests = (select(ForgetRequest).where(ForgetRequest.subject_id == subject_id).order_by(*_NEWEST_FIRST)
                .options(selectinload(ForgetRequest.parts)))
    if model_name is not None:
        models = models.where(Model.name == model_name)
        requests = requests.where(ForgetRequest.parts.any(ForgetRequestPart.model_name == model_name))
    models_by_dataset: dict[str, list[str]] = {}
    for name, dataset in session.execute(models):
        models_by_dataset.setdefault(dataset, []).append(name)
    forgotten = {
        (row.model_name, row.sample_id): row for row in session.execute(
            select(ForgottenSample).where(ForgottenSample.sample_id.in_([sample.id for sample in samples]))
        ).scalars()
    }
    records = []
    for sample in samples:
        if model_name is not None and sample.dataset not in models_by_dataset:
            continue
        holdings = []
        for name in models_by_dataset.get(sample.dataset, []):
            row = forgotten.get((name, sample.id))
            if row is not None:
                holdings.append(Holding(name, "forgotten", row.forgotten_at, row.version_id))
            elif sample.train_size is not None and sample.dataset_index < sample.train_size:
                holdings.append(Holding(name, "held"))
        records.append(SampleRecord(sample.id, sample.dataset, sample.dataset_index, sample.subject_id, holdings))
    filed = [as_seen_by(f, model_name) for f in _with_sample_ids(session, session.scalars(requests).all())]
    return SubjectRecord(subject, records, filed)


def _with_sample_ids(session: Session, requests: list[ForgetRequest]) -> list[FiledRequest]:
    sample_ids = sample_ids_of_requests(session, [request.id for request in requests])
    return [FiledRequest(request, sample_ids[request.id], list(request.parts)) for request in requests]


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
