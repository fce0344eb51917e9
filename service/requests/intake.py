"""Taking in forget requests: check them against the database, store them, audit them.

A request fans out to one part per model that holds any of its samples (service.requests.holdings),
or to the one model it names. A sample a model is already forgetting in an open part (of an
earlier request of the same subject) gets no second part for that model: the request is linked to
the newest request whose open part covers one of its samples, and waits for the requests it relies
on (service.requests.lifecycle). A request left with no part of its own is still filed, linked:
the subject asked, and is answered with the work that covers it.

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
from datetime import datetime, timedelta

from sqlalchemy import Row, bindparam, delete, insert, or_, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service.core.audit_log import append_audit_entries, audit_key
from service.core.models import (
    Dataset,
    ForgetRequest,
    ForgetRequestPart,
    ForgetRequestSample,
    ForgottenSample,
    IdempotencyRecord,
    Model,
    Sample,
    Subject,
    as_utc,
    utcnow,
)
from service.core.pseudonyms import pseudonym
from service.requests import lifecycle
from service.requests.idempotency import HEADER as IDEMPOTENCY_HEADER
from service.requests.idempotency import Replay
from service.requests.problems import RequestValidationProblem, format_ids
from service.requests.queries import FiledRequest
from service.webhooks import events as webhook_events

MAX_SAMPLES_PER_REQUEST = 10_000


@dataclass(frozen=True)
class IdempotencyClaim:
    """The Idempotency-Key a submission came with (service.requests.idempotency)."""

    api_key_id: int
    key: str
    fingerprint: str


@dataclass(frozen=True)
class Submission:
    """One request to file: a subject's samples (all of them if `sample_ids` is None), from one model
    or from every model that holds them (`model_name` None)."""

    subject_id: str
    sample_ids: list[int] | None
    model_name: str | None
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
    model_name: str | None,
    deadline_days: int,
    actor: str,
) -> FiledRequest:
    """Store a pending request to forget a subject's samples (all of them if `sample_ids` is None)
    from `model_name`, or from every model holding them (None); the caller commits. One submission
    of `file_forget_requests`, for code and tests.

    Raises:
        RequestValidationProblem: the input names something that does not exist or cannot be
            forgotten.
    """
    submission = Submission(subject_id, sample_ids, model_name, deadline_days, actor)
    [outcome] = file_forget_requests(session, [submission])
    if isinstance(outcome, RequestValidationProblem):
        raise outcome
    # The stored request, attached to the session (a caller may change it before committing).
    return FiledRequest(session.get(ForgetRequest, outcome.request.id), outcome.sample_ids, outcome.parts)


def file_forget_requests(
    session: Session,
    submissions: list[Submission],
    response_body: Callable[[FiledRequest], dict] | None = None,
) -> list[Outcome]:
    """File many submissions in the caller's transaction, each as if filed alone in list order
    (a sample claimed by an earlier one is in an open part for a later one), in a fixed number
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
        parts = [{"request_id": f.request.id, "model_name": part.model_name, "status": part.status}
                 for f in filed for part in f.parts]
        if parts:  # none when every request filed follows another
            connection.execute(_INSERT_REQUEST_PARTS, parts)
        webhook_events.received(session, filed)  # one more insert, only where a webhook endpoint is configured
    _settle_idempotency_keys(session, submissions, outcomes, claimed, response_body)
    # Last: the audit lock is held from here to the commit, and every intake waits on it.
    key = audit_key(session)  # the log names subjects and samples by their pseudonyms only
    append_audit_entries(
        session,
        [
            {
                "actor": submissions[i].actor,
                "action": "request.received",
                "object_type": "forget_request",
                "object_id": outcomes[i].request.id,
                "details": {
                    "subject_pseudonym": pseudonym(key, "subject", outcomes[i].request.subject_id),
                    "model": outcomes[i].request.model_name,
                    "parts": [part.model_name for part in outcomes[i].parts],
                    "sample_pseudonyms": [pseudonym(key, "sample", sample_id) for sample_id in outcomes[i].sample_ids],
                    "due_at": outcomes[i].request.due_at.isoformat(),
                    "linked_to": outcomes[i].request.linked_request_id,
                },
            }
            for i in range(len(submissions))
            if isinstance(outcomes[i], FiledRequest)
        ],
    )
    return outcomes


_INSERT_REQUESTS = insert(ForgetRequest.__table__)


_INSERT_REQUEST_SAMPLES = insert(ForgetRequestSample.__table__)


_INSERT_REQUEST_PARTS = insert(ForgetRequestPart.__table__)


def _row(request: ForgetRequest) -> dict:
    return {column: getattr(request, column) for column in
            ("id", "subject_id", "model_name", "status", "received_at", "due_at", "linked_request_id")}


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
# Every model is read: a request without a model goes to all that hold its samples (a handful).
_MODELS = (
    select(Model.name, Model.dataset, Model.deployed_version_id, Model.semi_parametric, Dataset.train_size)
    .outerjoin(Dataset, Dataset.name == Model.dataset)
)


_SUBJECTS = select(Subject.id).where(Subject.id.in_(bindparam("subject_ids", expanding=True)))


_WANTED_SAMPLES = or_(
    Sample.id.in_(bindparam("named_ids", expanding=True)),
    Sample.subject_id.in_(bindparam("whole_subjects", expanding=True)),
)


# FOR UPDATE: two requests naming the same sample at once queue here on PostgreSQL, so the second
# one sees the first's parts below (SQLite serialises whole transactions). In id order, as the
# worker's insert of forgotten samples, so the two cannot deadlock.
_LOCK_SAMPLES = (
    select(Sample.id, Sample.subject_id, Sample.dataset, Sample.dataset_index)
    .where(_WANTED_SAMPLES)
    .order_by(Sample.id)
    .with_for_update(of=Sample)
)


_FORGOTTEN = (
    select(ForgottenSample.model_name, ForgottenSample.sample_id)
    .join(Sample, Sample.id == ForgottenSample.sample_id)
    .where(_WANTED_SAMPLES)
)


_OPEN_PARTS = (
    select(ForgetRequestSample.sample_id, ForgetRequestPart.request_id, ForgetRequestPart.model_name,
           ForgetRequest.received_at)
    .join(ForgetRequestPart, ForgetRequestPart.request_id == ForgetRequestSample.request_id)
    .join(ForgetRequest, ForgetRequest.id == ForgetRequestSample.request_id)
    .join(Sample, Sample.id == ForgetRequestSample.sample_id)
    .where(ForgetRequestPart.status.in_(lifecycle.OPEN_STATUSES), _WANTED_SAMPLES)
)


class _BatchCheck:
    """What the checks of a batch of submissions need from the database, read in five statements,
    and the samples the batch has claimed so far."""

    def __init__(self, session: Session, submissions: list[Submission]):
        self.models: dict[str, Row] = {}  # name -> (name, dataset, deployed_version_id, semi_parametric, train_size)
        self.subjects: set[str] = set()
        self.samples: dict[int, Row] = {}
        self.forgotten: set[tuple[str, int]] = set()  # (model, sample) the model no longer holds
        # (model, sample) -> (received_at, id) of the newest open request whose part for the model holds
        # it; the batch's own join as filed.
        self.open_parts: dict[tuple[str, int], tuple[datetime, str]] = {}
        if not submissions:
            return  # every submission was refused or replayed before the reads
        # Core on the session's connection: plain rows, none of the ORM's per-statement work.
        connection = session.connection()
        self.models = {row.name: row for row in connection.execute(_MODELS)}
        subject_ids = sorted({s.subject_id for s in submissions})
        self.subjects = set(connection.scalars(_SUBJECTS, {"subject_ids": subject_ids}))
        wanted = {
            "named_ids": sorted({i for s in submissions if s.sample_ids is not None for i in s.sample_ids}),
            "whole_subjects": sorted({s.subject_id for s in submissions if s.sample_ids is None}),
        }
        self.samples = {row.id: row for row in connection.execute(_LOCK_SAMPLES, wanted)}
        if self.samples:
            self.forgotten = {(row.model_name, row.sample_id) for row in connection.execute(_FORGOTTEN, wanted)}
            for row in connection.execute(_OPEN_PARTS, wanted):
                newest = (as_utc(row.received_at), row.request_id)
                self.open_parts[(row.model_name, row.sample_id)] = max(
                    newest, self.open_parts.get((row.model_name, row.sample_id), newest))

    def file(self, submission: Submission) -> FiledRequest:
        """The request filed for `submission` (not yet added to the session), or the problem."""
        if submission.model_name is None:
            targets = [model for model in self.models.values() if model.deployed_version_id is not None]
        else:
            model = self.models.get(submission.model_name)
            if model is None:
                raise RequestValidationProblem(
                    "model", f"unknown model {submission.model_name!r}", error_type="unknown_model"
                )
            targets = [model]
        subject_id = submission.subject_id
        if subject_id not in self.subjects:
            raise RequestValidationProblem("subject_id", f"unknown subject {subject_id!r}", error_type="unknown_subject")
        if submission.sample_ids is None:
            held = sorted(row.id for row in self.samples.values()
                          if row.subject_id == subject_id and any(self._holds(model, row.id) for model in targets))
            if not held:
                raise _nothing_held(subject_id, submission.model_name)
        else:
            held = self._check_named(subject_id, submission, targets)
        # Per model, the samples no open part of it covers yet: only those need a part; the newest
        # request covering the others is the one this request is linked to.
        parts = {
            model.name: free for model in targets
            if (free := [i for i in held if self._holds(model, i) and (model.name, i) not in self.open_parts])
        }
        covering = [self.open_parts[(model.name, i)] for model in targets for i in held
                    if self._holds(model, i) and (model.name, i) in self.open_parts]
        received_at = utcnow()
        request = ForgetRequest(
            id=str(uuid.uuid4()),
            subject_id=subject_id,
            model_name=submission.model_name,
            status=lifecycle.FILED,
            received_at=received_at,
            due_at=received_at + timedelta(days=submission.deadline_days),
            linked_request_id=max(covering)[1] if covering else None,
        )
        for model_name, free in parts.items():
            self.open_parts.update({(model_name, sample_id): (received_at, request.id) for sample_id in free})
        return FiledRequest(
            request, held, [ForgetRequestPart(model_name=name, status=lifecycle.FILED) for name in sorted(parts)],
            instant_models=[name for name in sorted(parts) if self.models[name].semi_parametric],
        )

    def _holds(self, model: Row, sample_id: int) -> bool:
        # service.requests.holdings' rule, on the rows read above (one read for a whole batch).
        sample = self.samples[sample_id]
        return (
            model.deployed_version_id is not None
            and sample.dataset == model.dataset
            and model.train_size is not None
            and sample.dataset_index < model.train_size
            and (model.name, sample_id) not in self.forgotten
        )

    def _check_named(self, subject_id: str, submission: Submission, targets: list[Row]) -> list[int]:
        sample_ids = submission.sample_ids
        found = {i: self.samples[i] for i in sample_ids if i in self.samples}
        scope = "" if submission.model_name is None else f" by model {submission.model_name!r}"
        problems = [
            ("unknown_samples", "unknown sample ids", [i for i in sample_ids if i not in found]),
            # Which subject they belong to is that subject's business: the message does not say.
            ("foreign_samples", f"samples that do not belong to subject {subject_id!r}",
             [i for i, row in found.items() if row.subject_id != subject_id]),
            ("forgotten_samples", f"samples no longer held{scope} (already forgotten, or never learned)",
             [i for i in found if not any(self._holds(model, i) for model in targets)]),
        ]
        for error_type, what, ids in problems:
            if ids:
                raise RequestValidationProblem("sample_ids", f"{what}: {format_ids(ids)}", error_type=error_type)
        return sorted(sample_ids)


def _nothing_held(subject_id: str, model_name: str | None) -> RequestValidationProblem:
    scope = "any model" if model_name is None else f"model {model_name!r}"
    return RequestValidationProblem(
        "subject_id", f"subject {subject_id!r} has no samples that {scope} still holds", error_type="no_active_samples"
    )


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
