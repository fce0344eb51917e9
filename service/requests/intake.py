"""Taking in forget requests: check them against the database, store them, audit them.

Plain functions over a Session, for the API and any other caller. Every check runs before the
first write, so input that is refused leaves no trace, not even an audit entry. The work is a
fixed number of statements whatever the number of samples, and of requests filed together (the
API files concurrent requests in one transaction: service/api/batch_queue.py). The checks are
synchronous, so a stored request goes straight to `pending` (service/requests/lifecycle.py).
"""

import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Row, and_, bindparam, delete, insert, or_, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service.core.audit_log import append_audit_entries
from service.core.models import (
    ForgetRequest,
    ForgetRequestSample,
    IdempotencyRecord,
    Model,
    Sample,
    SampleStatus,
    Subject,
    utcnow,
)
from service.requests import lifecycle
from service.requests.idempotency import HEADER as IDEMPOTENCY_HEADER
from service.requests.idempotency import Replay
from service.requests.problems import RequestConflict, RequestValidationProblem, format_ids
from service.requests.queries import FiledRequest

MAX_SAMPLES_PER_REQUEST = 10_000


@dataclass(frozen=True)
class IdempotencyClaim:
    """The Idempotency-Key a submission came with (service.requests.idempotency)."""

    api_key_id: int
    key: str
    fingerprint: str


@dataclass(frozen=True)
class Submission:
    """One request to file: a subject's samples (all its active ones if `sample_ids` is None)."""

    subject_id: str
    sample_ids: list[int] | None
    model_name: str
    deadline_days: int
    actor: str
    idempotency: IdempotencyClaim | None = None

    def parameter_count(self) -> int:
        """Roughly how many bound parameters it adds to a batch's statements."""
        return 2 + len(self.sample_ids or ())


# What filing one submission came to: filed, the first response to its idempotency key again, or
# refused (nothing of it written).
Outcome = FiledRequest | Replay | RequestValidationProblem


def file_forget_request(
    session: Session,
    *,
    subject_id: str,
    sample_ids: list[int] | None,
    model_name: str,
    deadline_days: int,
    actor: str,
) -> FiledRequest:
    """Store a pending request to forget a subject's samples (all its active ones if `sample_ids`
    is None); the caller commits. One submission of `file_forget_requests`, for code and tests.

    Raises:
        RequestValidationProblem: the input names something that does not exist or cannot be
            forgotten; RequestConflict (409) when samples are already in an open request.
    """
    submission = Submission(subject_id, sample_ids, model_name, deadline_days, actor)
    [outcome] = file_forget_requests(session, [submission])
    if isinstance(outcome, RequestValidationProblem):
        raise outcome
    # The stored request, attached to the session (a caller may change it before committing).
    return FiledRequest(session.get(ForgetRequest, outcome.request.id), outcome.sample_ids)


def file_forget_requests(
    session: Session,
    submissions: list[Submission],
    response_body: Callable[[FiledRequest], dict] | None = None,
) -> list[Outcome]:
    """File many submissions in the caller's transaction, each as if filed alone in list order
    (a sample claimed by an earlier one is in an open request for a later one), in a fixed number
    of statements whatever their number: the API's intake writes what arrived meanwhile at once.

    `response_body` makes the response stored for a submission's idempotency key; submissions
    with a key need it. A batch holds at most one submission per (API key, idempotency key), and
    its sample ids must fit a statement's parameters (intake.MAX_BATCH_PARAMETERS).
    """
    outcomes: list[Outcome | None] = [None] * len(submissions)
    claimed = _claim_idempotency_keys(session, submissions, outcomes)
    to_file = [i for i, outcome in enumerate(outcomes) if outcome is None]
    for i in to_file:
        if submissions[i].sample_ids is not None:
            try:
                _check_id_list(submissions[i].sample_ids)
            except RequestValidationProblem as problem:
                outcomes[i] = problem
    to_file = [i for i in to_file if outcomes[i] is None]
    checker = _BatchCheck(session, [submissions[i] for i in to_file])
    filed: list[FiledRequest] = []
    for i in to_file:
        try:
            outcomes[i] = checker.file(submissions[i])
            filed.append(outcomes[i])
        except RequestValidationProblem as problem:
            outcomes[i] = problem

    if filed:
        # Core executemany on the tables, not the ORM's bulk insert (per-row work in Python): one
        # prepared statement each, for any number of requests.
        connection = session.connection()
        connection.execute(_INSERT_REQUESTS, [_row(f.request) for f in filed])
        connection.execute(
            _INSERT_REQUEST_SAMPLES,
            [{"request_id": f.request.id, "sample_id": sample_id} for f in filed for sample_id in f.sample_ids],
        )
    _settle_idempotency_keys(session, submissions, outcomes, claimed, response_body)
    # Last: the audit lock is held from here to the commit, and every intake waits on it.
    append_audit_entries(
        session,
        [
            {
                "actor": submissions[i].actor,
                "action": "request.received",
                "object_type": "forget_request",
                "object_id": outcomes[i].request.id,
                "details": {
                    "subject_id": outcomes[i].request.subject_id,
                    "model": outcomes[i].request.model_name,
                    "sample_ids": outcomes[i].sample_ids,
                    "due_at": outcomes[i].request.due_at.isoformat(),
                },
            }
            for i in range(len(submissions))
            if isinstance(outcomes[i], FiledRequest)
        ],
    )
    return outcomes


_INSERT_REQUESTS = insert(ForgetRequest.__table__)


_INSERT_REQUEST_SAMPLES = insert(ForgetRequestSample.__table__)


def _row(request: ForgetRequest) -> dict:
    return {column: getattr(request, column) for column in
            ("id", "subject_id", "model_name", "status", "received_at", "due_at")}


def _claim_idempotency_keys(session: Session, submissions: list[Submission], outcomes: list) -> set[int]:
    """Record every submission's idempotency key before any other work; where a record exists
    already, the submission's outcome is its replay (or a 422 for another body). Returns the
    indexes of the submissions whose record this transaction inserted."""
    keyed = {i: s.idempotency for i, s in enumerate(submissions) if s.idempotency is not None}
    if not keyed:
        return set()
    # Inserted first, before the samples are locked: a concurrent request with the same key (a
    # retry landing on another API process) waits here for the first to commit, holding nothing
    # the first could wait for.
    inserted = {
        (row.api_key_id, row.key)
        for row in session.execute(
            _insert_ignoring_duplicates(session, IdempotencyRecord)
            .values([{"api_key_id": c.api_key_id, "key": c.key, "fingerprint": c.fingerprint,
                      "status_code": 0, "response_body": {}} for c in keyed.values()])
            .returning(IdempotencyRecord.api_key_id, IdempotencyRecord.key)
        )
    }
    claimed = {i for i, c in keyed.items() if (c.api_key_id, c.key) in inserted}
    taken = {i: c for i, c in keyed.items() if i not in claimed}
    if taken:
        stored = {
            (row.api_key_id, row.key): row
            for row in session.execute(
                select(IdempotencyRecord.api_key_id, IdempotencyRecord.key, IdempotencyRecord.fingerprint,
                       IdempotencyRecord.status_code, IdempotencyRecord.response_body)
                .where(IdempotencyRecord.key.in_({c.key for c in taken.values()}))
            )
        }
        for i, claim in taken.items():
            row = stored.get((claim.api_key_id, claim.key))
            if row is None:
                continue  # expired and deleted since the insert: filed as a request without a key
            outcomes[i] = (
                Replay(status_code=row.status_code, body=row.response_body)
                if row.fingerprint == claim.fingerprint
                else idempotency_key_reused()
            )
    return claimed


def _settle_idempotency_keys(
    session: Session,
    submissions: list[Submission],
    outcomes: list[Outcome],
    claimed: set[int],
    response_body: Callable[[FiledRequest], dict] | None,
) -> None:
    """Store the response of every claimed key whose submission was filed; forget the others'
    records (only a request that succeeded is remembered: a refused one's retry runs again)."""
    filed = [i for i in claimed if isinstance(outcomes[i], FiledRequest)]
    refused = [i for i in claimed if not isinstance(outcomes[i], FiledRequest)]
    if filed:
        if response_body is None:
            raise ValueError("submissions with an idempotency key need a response_body")
        session.execute(
            update(IdempotencyRecord),
            [
                {"api_key_id": submissions[i].idempotency.api_key_id, "key": submissions[i].idempotency.key,
                 "status_code": 202, "response_body": response_body(outcomes[i]),
                 "forget_request_id": outcomes[i].request.id}
                for i in filed
            ],
        )
    if refused:
        keys = [(submissions[i].idempotency.api_key_id, submissions[i].idempotency.key) for i in refused]
        session.execute(
            delete(IdempotencyRecord).where(tuple_(IdempotencyRecord.api_key_id, IdempotencyRecord.key).in_(keys))
        )


def _insert_ignoring_duplicates(session: Session, entity):
    dialect = session.get_bind().dialect.name
    module = {"postgresql": postgresql, "sqlite": sqlite}[dialect]
    return module.insert(entity).on_conflict_do_nothing()


# The batch's statements, built once: a statement built per call costs more Python than the
# database takes to run it (expanding IN parameters keep one compiled form for any list length).
_MODELS = select(Model.name, Model.dataset).where(Model.name.in_(bindparam("names", expanding=True)))


_SUBJECTS = select(Subject.id).where(Subject.id.in_(bindparam("subject_ids", expanding=True)))


_WANTED_SAMPLES = or_(
    Sample.id.in_(bindparam("named_ids", expanding=True)),
    and_(Sample.subject_id.in_(bindparam("whole_subjects", expanding=True)), Sample.status == SampleStatus.active),
)


# FOR UPDATE: two requests naming the same sample at once queue here on PostgreSQL, so the second
# one sees the first's links below (SQLite serialises whole transactions). In id order, as the
# worker's update of the same rows, so the two cannot deadlock.
_LOCK_SAMPLES = (
    select(Sample.id, Sample.subject_id, Sample.dataset, Sample.status)
    .where(_WANTED_SAMPLES)
    .order_by(Sample.id)
    .with_for_update()
)


_OPEN_LINKS = (
    select(ForgetRequestSample.sample_id, ForgetRequestSample.request_id, ForgetRequest.model_name)
    .join(ForgetRequest, ForgetRequest.id == ForgetRequestSample.request_id)
    .join(Sample, Sample.id == ForgetRequestSample.sample_id)
    .where(ForgetRequest.status.in_(lifecycle.OPEN_STATUSES), _WANTED_SAMPLES)
)


class _BatchCheck:
    """What the checks of a batch of submissions need from the database, read in four statements,
    and the samples the batch has claimed so far."""

    def __init__(self, session: Session, submissions: list[Submission]):
        self.models: dict[str, Row] = {}  # name -> (name, dataset)
        self.subjects: set[str] = set()
        self.samples: dict[int, Row] = {}
        # (model, sample) -> the open request holding it; the batch's own requests join as filed.
        self.open_links: dict[tuple[str, int], str] = {}
        if not submissions:
            return  # every submission was refused or replayed before the reads
        # Core on the session's connection: plain rows, none of the ORM's per-statement work.
        connection = session.connection()
        names = sorted({s.model_name for s in submissions})
        self.models = {row.name: row for row in connection.execute(_MODELS, {"names": names})}
        subject_ids = sorted({s.subject_id for s in submissions})
        self.subjects = set(connection.scalars(_SUBJECTS, {"subject_ids": subject_ids}))
        wanted = {
            "named_ids": sorted({i for s in submissions if s.sample_ids is not None for i in s.sample_ids}),
            "whole_subjects": sorted({s.subject_id for s in submissions if s.sample_ids is None}),
        }
        self.samples = {row.id: row for row in connection.execute(_LOCK_SAMPLES, wanted)}
        if self.samples:
            rows = connection.execute(_OPEN_LINKS, wanted)
            self.open_links = {(row.model_name, row.sample_id): row.request_id for row in rows}

    def file(self, submission: Submission) -> FiledRequest:
        """The request filed for `submission` (not yet added to the session), or the problem."""
        model = self.models.get(submission.model_name)
        if model is None:
            raise RequestValidationProblem(
                "model", f"unknown model {submission.model_name!r}", error_type="unknown_model"
            )
        subject_id = submission.subject_id
        if subject_id not in self.subjects:
            raise RequestValidationProblem("subject_id", f"unknown subject {subject_id!r}", error_type="unknown_subject")
        if submission.sample_ids is None:
            chosen = self._all_active_samples(subject_id, model)
        else:
            chosen = self._check_samples(subject_id, model, submission.sample_ids)
        received_at = utcnow()
        request = ForgetRequest(
            id=str(uuid.uuid4()),
            subject_id=subject_id,
            model_name=model.name,
            status=lifecycle.FILED,
            received_at=received_at,
            due_at=received_at + timedelta(days=submission.deadline_days),
        )
        self.open_links.update({(model.name, sample_id): request.id for sample_id in chosen})
        return FiledRequest(request, chosen)

    def _all_active_samples(self, subject_id: str, model: Row) -> list[int]:
        """The subject's active samples in the model's data set that no open request holds yet."""
        active = [
            row.id for row in self.samples.values()
            if row.subject_id == subject_id and row.dataset == model.dataset and row.status == SampleStatus.active
        ]
        chosen = sorted(i for i in active if (model.name, i) not in self.open_links)
        if chosen:
            return chosen
        # Nothing left: say whether there never was anything, or it is all in requests under way.
        open_requests = sorted({self.open_links[(model.name, i)] for i in active})
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

    def _check_samples(self, subject_id: str, model: Row, sample_ids: list[int]) -> list[int]:
        found = {i: self.samples[i] for i in sample_ids if i in self.samples}
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
        in_open = {i: self.open_links[(model.name, i)] for i in sample_ids if (model.name, i) in self.open_links}
        if in_open:
            raise RequestConflict(
                "sample_ids",
                f"samples already in an open request: {format_ids(in_open)} "
                f"(requests {', '.join(sorted(set(in_open.values())))})",
                error_type="samples_in_open_request",
            )
        return sorted(sample_ids)


def idempotency_key_reused() -> RequestValidationProblem:
    return RequestValidationProblem(
        IDEMPOTENCY_HEADER,
        f"this {IDEMPOTENCY_HEADER} was already used with a different request body; "
        "send a new key for a new request, or the same body to get the first response again",
        error_type="idempotency_key_reused",
        location="header",
    )


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
