"""Taking in forget requests: check them against the database, store them, audit them.

Plain functions over a Session, for the API and any other caller. Every check runs before the
first write, so input that is refused leaves no trace, not even an audit entry. The work is a
fixed number of statements whatever the number of samples. The checks are synchronous, so a
stored request goes straight to `pending` (DESIGN.md's `received` is the moment of this call).
"""

import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Select, insert, select
from sqlalchemy.orm import Session

from service.audit_log import append_audit
from service.models import (
    ForgetRequest,
    ForgetRequestSample,
    Model,
    RequestStatus,
    Sample,
    SampleStatus,
    Subject,
    utcnow,
)

MAX_SAMPLES_PER_REQUEST = 10_000
# A sample in one of these is already on its way to being forgotten.
OPEN_STATUSES = (RequestStatus.received, RequestStatus.pending, RequestStatus.batched)
# How many offending ids an error message lists before it only counts the rest.
LISTED_IDS = 20


class RequestValidationProblem(ValueError):
    """Input that cannot become a forget request. `field` names the request field at fault, in
    the body unless `location` says otherwise (e.g. "header")."""

    def __init__(
        self, field: str, message: str, *, error_type: str, status_code: int = 422, location: str = "body"
    ):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.error_type = error_type
        self.status_code = status_code
        self.location = location


class RequestConflict(RequestValidationProblem):
    """Valid input that collides with requests already open; it may succeed once they are done."""

    def __init__(self, field: str, message: str, *, error_type: str):
        super().__init__(field, message, error_type=error_type, status_code=409)


@dataclass(frozen=True)
class FiledRequest:
    request: ForgetRequest
    sample_ids: list[int]  # the samples it asks to forget, ascending


def create_forget_request(
    session: Session,
    *,
    subject_id: str,
    sample_ids: list[int] | None,
    model_name: str,
    deadline_days: int,
    actor: str,
) -> ForgetRequest:
    """Store a pending request to forget a subject's samples (all its active ones if `sample_ids` is None).

    Raises:
        RequestValidationProblem: the input names something that does not exist or cannot be
            forgotten; RequestConflict (409) when samples are already in an open request.
    """
    return file_forget_request(
        session, subject_id=subject_id, sample_ids=sample_ids, model_name=model_name,
        deadline_days=deadline_days, actor=actor,
    ).request


def file_forget_request(
    session: Session,
    *,
    subject_id: str,
    sample_ids: list[int] | None,
    model_name: str,
    deadline_days: int,
    actor: str,
) -> FiledRequest:
    """create_forget_request, also giving the chosen sample ids: the API answers with them without
    reading them back (the audit lock is held from the audit entry to the commit, so every
    statement after it delays every other intake)."""
    if sample_ids is not None:
        _check_id_list(sample_ids)
    # The model and whether the subject exists, in one statement (every statement costs the API CPU).
    found = session.execute(
        select(Model, select(Subject.id).where(Subject.id == subject_id).exists()).where(Model.name == model_name)
    ).first()
    if found is None:
        raise RequestValidationProblem("model", f"unknown model {model_name!r}", error_type="unknown_model")
    model, subject_exists = found
    if not subject_exists:
        raise RequestValidationProblem(
            "subject_id", f"unknown subject {subject_id!r}", error_type="unknown_subject"
        )
    if sample_ids is None:
        chosen = _all_active_samples(session, subject_id, model)
    else:
        chosen = _check_samples(session, subject_id, model, sample_ids)

    received_at = utcnow()
    request = ForgetRequest(
        id=str(uuid.uuid4()),
        subject_id=subject_id,
        model_name=model.name,
        status=RequestStatus.pending,
        received_at=received_at,
        due_at=received_at + timedelta(days=deadline_days),
    )
    session.add(request)
    session.flush()
    session.execute(
        insert(ForgetRequestSample), [{"request_id": request.id, "sample_id": sample_id} for sample_id in chosen]
    )
    append_audit(
        session,
        actor=actor,
        action="request.received",
        object_type="forget_request",
        object_id=request.id,
        details={
            "subject_id": subject_id,
            "model": model.name,
            "sample_ids": chosen,
            "due_at": request.due_at.isoformat(),
        },
    )
    return FiledRequest(request, chosen)


def request_with_sample_ids(session: Session, request_id: str) -> FiledRequest | None:
    """A request and its sample ids (ascending) in one statement, or None if there is no such request."""
    rows = session.execute(
        select(ForgetRequest, ForgetRequestSample.sample_id)
        .outerjoin(ForgetRequestSample, ForgetRequestSample.request_id == ForgetRequest.id)
        .where(ForgetRequest.id == request_id)
        .order_by(ForgetRequestSample.sample_id)
    ).all()
    if not rows:
        return None
    return FiledRequest(rows[0][0], [sample_id for _, sample_id in rows if sample_id is not None])


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


def _check_id_list(sample_ids: list[int]) -> None:
    if not sample_ids:
        raise RequestValidationProblem(
            "sample_ids", "the list is empty; omit it to forget all of the subject's samples", error_type="too_short"
        )
    if len(sample_ids) > MAX_SAMPLES_PER_REQUEST:
        raise RequestValidationProblem(
            "sample_ids",
            f"{len(sample_ids)} sample ids, more than the {MAX_SAMPLES_PER_REQUEST} one request may name",
            error_type="too_long",
        )
    repeated = [sample_id for sample_id, count in Counter(sample_ids).items() if count > 1]
    if repeated:
        raise RequestValidationProblem(
            "sample_ids", f"sample ids listed more than once: {format_ids(repeated)}", error_type="duplicate_samples"
        )


def _all_active_samples(session: Session, subject_id: str, model: Model) -> list[int]:
    """The subject's active samples in the model's data set that no open request holds yet."""
    active = (Sample.subject_id == subject_id, Sample.dataset == model.dataset, Sample.status == SampleStatus.active)
    already_open = _open_links(model).where(ForgetRequestSample.sample_id == Sample.id).exists()
    chosen = list(
        session.scalars(select(Sample.id).where(*active, ~already_open).order_by(Sample.id).with_for_update())
    )
    if chosen:
        return chosen
    # Nothing left: say whether there never was anything, or it is all in requests under way.
    open_requests = sorted(
        {
            row.request_id
            for row in session.execute(
                _open_links(model).join(Sample, Sample.id == ForgetRequestSample.sample_id).where(*active)
            )
        }
    )
    if open_requests:
        raise RequestConflict(
            "subject_id",
            f"every active sample of subject {subject_id!r} is already in an open request: "
            f"{', '.join(open_requests)}",
            error_type="samples_in_open_request",
        )
    raise RequestValidationProblem(
        "subject_id",
        f"subject {subject_id!r} has no active samples in data set {model.dataset!r} of model {model.name!r}",
        error_type="no_active_samples",
    )


def _check_samples(session: Session, subject_id: str, model: Model, sample_ids: list[int]) -> list[int]:
    # FOR UPDATE: two requests naming the same sample at once queue here on PostgreSQL, so the
    # second one sees the first's links below (SQLite serialises whole transactions). In id order,
    # as the worker's update of the same rows, so the two cannot deadlock.
    found = {
        row.id: row
        for row in session.execute(
            select(Sample.id, Sample.subject_id, Sample.dataset, Sample.status)
            .where(Sample.id.in_(sample_ids))
            .order_by(Sample.id)
            .with_for_update()
        )
    }
    problems = [
        ("unknown_samples", "unknown sample ids", [i for i in sample_ids if i not in found]),
        # Which subject they belong to is that subject's business: the message does not say.
        ("foreign_samples", f"samples that do not belong to subject {subject_id!r}",
         [i for i, row in found.items() if row.subject_id != subject_id]),
        ("other_dataset_samples", f"samples not in data set {model.dataset!r} of model {model.name!r}",
         [i for i, row in found.items() if row.dataset != model.dataset]),
        ("forgotten_samples", "samples already forgotten",
         [i for i, row in found.items() if row.status != SampleStatus.active]),
    ]
    for error_type, what, ids in problems:
        if ids:
            raise RequestValidationProblem("sample_ids", f"{what}: {format_ids(ids)}", error_type=error_type)

    in_open = session.execute(_open_links(model).where(ForgetRequestSample.sample_id.in_(sample_ids))).all()
    if in_open:
        requests = sorted({row.request_id for row in in_open})
        raise RequestConflict(
            "sample_ids",
            f"samples already in an open request: {format_ids(row.sample_id for row in in_open)} "
            f"(requests {', '.join(requests)})",
            error_type="samples_in_open_request",
        )
    return sorted(sample_ids)


def _open_links(model: Model) -> Select:
    """(sample_id, request_id) of every sample in an open request for this model."""
    return (
        select(ForgetRequestSample.sample_id, ForgetRequestSample.request_id)
        .join(ForgetRequest, ForgetRequest.id == ForgetRequestSample.request_id)
        .where(ForgetRequest.model_name == model.name, ForgetRequest.status.in_(OPEN_STATUSES))
    )


def format_ids(ids: Iterable[int]) -> str:
    ordered = sorted(set(ids))
    shown = ", ".join(str(i) for i in ordered[:LISTED_IDS])
    more = len(ordered) - LISTED_IDS
    return f"{shown} and {more} more" if more > 0 else shown
