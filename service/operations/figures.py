"""Every operations figure, read from the database and the broker as plain data.

`read_figures` reads the database in one short session, then asks the broker for its queue lengths.
The figures are aggregates per model (and status, kind, event or queue); the per-batch rows (held
batches, leases) carry batch ids, never subject or request ids.
"""

import math
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from sqlalchemy import String, cast, exists, func, select
from sqlalchemy.orm import Session

from service.core.models import (
    AuditEntry,
    Batch,
    BatchStatus,
    Evaluation,
    ForgetRequest,
    ForgetRequestPart,
    ForgetRequestSample,
    ForgottenSample,
    Model,
    ModelVersion,
    Sample,
    as_utc,
    utcnow,
)
from service.core.settings import Settings
from service.operations.broker import queue_lengths
from service.requests import lifecycle

DUE_SOON = timedelta(days=7)
# Upper bounds of the batch duration histogram, in seconds: ten seconds (the digits CNN on a GPU)
# to four hours (a large model on a slow card).
DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)


@dataclass(frozen=True)
class RequestCount:
    model: str
    status: str
    count: int


@dataclass(frozen=True)
class DueDates:
    """A model's open requests against their GDPR due dates."""

    model: str
    past_due: int
    due_soon: int  # due within DUE_SOON, past due included
    oldest_open_age_seconds: float


@dataclass(frozen=True)
class PendingSamples:
    model: str
    count: int  # distinct samples in pending requests: what the batch policy compares with min_samples


@dataclass(frozen=True)
class BatchCount:
    model: str
    status: str
    count: int


@dataclass(frozen=True)
class DurationBucket:
    le: int  # upper bound, seconds
    count: int  # batches that took at most `le` seconds (cumulative)


@dataclass(frozen=True)
class BatchDurations:
    """Completed batches' wall time (claim to deployment, retries included) as a cumulative histogram."""

    model: str
    count: int
    sum_seconds: float
    buckets: list[DurationBucket]
    last_seconds: float  # the newest completed batch's


@dataclass(frozen=True)
class BatchEventCount:
    model: str
    event: str  # the audit action without its "batch." prefix: claimed, held, completed, ...
    count: int


@dataclass(frozen=True)
class HeldBatch:
    model: str
    batch_id: int
    held_seconds: float
    reason: str | None  # the quality gate's


@dataclass(frozen=True)
class Lease:
    """A running batch's lease; negative remaining seconds: expired, its worker presumed dead."""

    model: str
    batch_id: int
    owner: str | None
    attempt: int
    remaining_seconds: float | None


@dataclass(frozen=True)
class EvaluationFigures:
    """A version's newest evaluation against its retrain reference; only the figures that are numbers."""

    id: int
    reference_id: int
    approximate: bool  # against an approximate reference (a coreset's): interim figures, labelled on the dashboard
    age_seconds: float
    metrics: dict[str, float]
    reference_metrics: dict[str, float]
    gaps: dict[str, float]


@dataclass(frozen=True)
class Deployment:
    model: str
    version_id: int
    evaluation: EvaluationFigures | None  # None: not evaluated yet


@dataclass(frozen=True)
class VersionCount:
    model: str
    kind: str
    count: int


@dataclass(frozen=True)
class DatabaseFigures:
    requests: list[RequestCount]
    due: list[DueDates]
    pending_samples: list[PendingSamples]
    batches: list[BatchCount]
    batch_durations: list[BatchDurations]
    batch_events: list[BatchEventCount]
    held_batches: list[HeldBatch]
    leases: list[Lease]
    deployments: list[Deployment]
    versions: list[VersionCount]


@dataclass(frozen=True)
class BrokerFigures:
    transport: str  # the broker URL's scheme: redis, filesystem, ...
    up: bool  # whether it answered
    queues: dict[str, int]  # messages waiting per queue; empty when it did not answer


@dataclass(frozen=True)
class OperationsFigures:
    generated_at: datetime
    database: DatabaseFigures
    broker: BrokerFigures

    def as_json(self) -> dict:
        """One JSON object: generated_at, the database's figures by name, then the broker's."""
        return {"generated_at": self.generated_at.isoformat(), **asdict(self.database), "broker": asdict(self.broker)}


def read_figures(session: Session, settings: Settings) -> OperationsFigures:
    """The database's figures, then the broker's."""
    now = utcnow()
    database = read_database_figures(session, now)
    # End the read before asking the broker: no connection (on SQLite, no lock) held meanwhile.
    session.rollback()
    return OperationsFigures(generated_at=now, database=database, broker=read_broker_figures(settings))


def read_broker_figures(settings: Settings) -> BrokerFigures:
    lengths = queue_lengths(settings)
    return BrokerFigures(transport=settings.broker_url.split("://", 1)[0], up=lengths is not None,
                         queues=lengths or {})


def read_database_figures(session: Session, now: datetime) -> DatabaseFigures:
    """Every figure the database holds, ages and due dates counted from `now`."""
    return DatabaseFigures(
        requests=_requests(session),
        due=_due_dates(session, now),
        pending_samples=_pending_samples(session),
        batches=_batches(session),
        batch_durations=_batch_durations(session),
        batch_events=_batch_events(session),
        held_batches=_held_batches(session, now),
        leases=_leases(session, now),
        deployments=_deployments(session, now),
        versions=_versions(session),
    )


def _requests(session: Session) -> list[RequestCount]:
    return [
        RequestCount(model, status.value, count)
        for model, status, count in session.execute(
            select(ForgetRequestPart.model_name, ForgetRequestPart.status, func.count())
            .group_by(ForgetRequestPart.model_name, ForgetRequestPart.status)
            .order_by(ForgetRequestPart.model_name, ForgetRequestPart.status)
        )
    ]


def _due_dates(session: Session, now: datetime) -> list[DueDates]:
    return [
        DueDates(model, past_due=overdue, due_soon=soon,
                 oldest_open_age_seconds=(now - as_utc(first_received)).total_seconds())
        for model, first_received, overdue, soon in session.execute(
            select(ForgetRequestPart.model_name, func.min(ForgetRequest.received_at),
                   func.count().filter(ForgetRequest.due_at < now),
                   func.count().filter(ForgetRequest.due_at < now + DUE_SOON))
            .join(ForgetRequest, ForgetRequest.id == ForgetRequestPart.request_id)
            .where(ForgetRequestPart.status.in_(lifecycle.OPEN_STATUSES)).group_by(ForgetRequestPart.model_name)
            .order_by(ForgetRequestPart.model_name)
        )
    ]


def _pending_samples(session: Session) -> list[PendingSamples]:
    # The batch policy counts samples, not requests: a sample two requests name counts once.
    return [
        PendingSamples(model, count)
        for model, count in session.execute(
            select(ForgetRequestPart.model_name, func.count(func.distinct(ForgetRequestSample.sample_id)))
            .join(ForgetRequestSample, ForgetRequestSample.request_id == ForgetRequestPart.request_id)
            .join(Sample, Sample.id == ForgetRequestSample.sample_id)
            .join(Model, Model.name == ForgetRequestPart.model_name)
            # The model's own samples of the request that it still holds: what its next run forgets.
            .where(ForgetRequestPart.status.in_(lifecycle.CLAIMABLE_STATUSES), Sample.dataset == Model.dataset,
                   ~exists().where(ForgottenSample.model_name == ForgetRequestPart.model_name,
                                   ForgottenSample.sample_id == Sample.id))
            .group_by(ForgetRequestPart.model_name).order_by(ForgetRequestPart.model_name)
        )
    ]


def _batches(session: Session) -> list[BatchCount]:
    return [
        BatchCount(model, status.value, count)
        for model, status, count in session.execute(
            select(Batch.model_name, Batch.status, func.count())
            .group_by(Batch.model_name, Batch.status).order_by(Batch.model_name, Batch.status)
        )
    ]


def _seconds_between(session: Session, start, end):
    """A SQL expression for `end - start` in seconds, on PostgreSQL and on SQLite."""
    if session.get_bind().dialect.name == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return func.extract("epoch", end - start)


def _batch_durations(session: Session) -> list[BatchDurations]:
    seconds = _seconds_between(session, Batch.created_at, Batch.finished_at)
    done = (Batch.status == BatchStatus.completed, Batch.finished_at.is_not(None))
    rows = session.execute(
        select(Batch.model_name, func.count(), func.sum(seconds),
               *(func.count().filter(seconds <= bound) for bound in DURATION_BUCKETS))
        .where(*done).group_by(Batch.model_name).order_by(Batch.model_name)
    ).all()
    newest = (select(Batch.model_name, func.max(Batch.id).label("id"))
              .where(*done).group_by(Batch.model_name).subquery())
    last = {model: seconds for model, seconds in session.execute(
        select(Batch.model_name, seconds).join(newest, Batch.id == newest.c.id))}
    return [
        BatchDurations(model, count, sum_seconds=float(total or 0.0),
                       buckets=[DurationBucket(bound, within) for bound, within in zip(DURATION_BUCKETS, cumulative)],
                       last_seconds=float(last[model]))
        for model, count, total, *cumulative in rows
    ]


def _batch_events(session: Session) -> list[BatchEventCount]:
    # Every batch.* entry of the audit log per model: claimed, held (the quality gate), approved,
    # discarded, attempt_failed, failed, lease_taken_over, completed. The log is append-only, so
    # these only grow: counters whose rate is "holds per day" and so on.
    return [
        BatchEventCount(model, action.removeprefix("batch."), count)
        for model, action, count in session.execute(
            select(Batch.model_name, AuditEntry.action, func.count())
            .join(Batch, AuditEntry.object_id == cast(Batch.id, String))
            .where(AuditEntry.object_type == "batch", AuditEntry.action.like("batch.%"))
            .group_by(Batch.model_name, AuditEntry.action).order_by(Batch.model_name, AuditEntry.action)
        )
    ]


def _held_batches(session: Session, now: datetime) -> list[HeldBatch]:
    return [
        HeldBatch(model, batch_id, held_seconds=(now - as_utc(created)).total_seconds(), reason=reason)
        for model, batch_id, created, reason in session.execute(
            select(Batch.model_name, Batch.id, Batch.created_at, Batch.hold_reason)
            .where(Batch.status == BatchStatus.held).order_by(Batch.id)
        )
    ]


def _leases(session: Session, now: datetime) -> list[Lease]:
    return [
        Lease(model, batch_id, owner, attempt=attempts,
              remaining_seconds=(as_utc(expires) - now).total_seconds() if expires else None)
        for model, batch_id, owner, attempts, expires in session.execute(
            select(Batch.model_name, Batch.id, Batch.lease_owner, Batch.attempts, Batch.lease_expires_at)
            .where(Batch.status == BatchStatus.running).order_by(Batch.model_name)
        )
    ]


def _deployments(session: Session, now: datetime) -> list[Deployment]:
    deployed_models = session.scalars(
        select(Model).where(Model.deployed_version_id.is_not(None)).order_by(Model.name))
    return [Deployment(model.name, model.deployed_version_id,
                       _newest_evaluation(session, model.deployed_version_id, now))
            for model in deployed_models]


def _newest_evaluation(session: Session, version_id: int, now: datetime) -> EvaluationFigures | None:
    evaluation = session.scalars(
        select(Evaluation).where(Evaluation.version_id == version_id)
        .order_by(Evaluation.created_at.desc(), Evaluation.id.desc()).limit(1)
    ).first()
    if evaluation is None:
        return None
    return EvaluationFigures(
        id=evaluation.id,
        reference_id=evaluation.reference_id,
        approximate=evaluation.approximate,
        age_seconds=(now - as_utc(evaluation.created_at)).total_seconds(),
        metrics=_numbers(evaluation.metrics),
        reference_metrics=_numbers(evaluation.reference_metrics),
        gaps=_numbers(evaluation.gaps),
    )


def _numbers(values: dict) -> dict[str, float]:
    # Evaluations are JSON written by the worker; keep the figures that are numbers.
    return {key: float(value) for key, value in values.items()
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)}


def _versions(session: Session) -> list[VersionCount]:
    return [
        VersionCount(model, kind.value, count)
        for model, kind, count in session.execute(
            select(ModelVersion.model_name, ModelVersion.kind, func.count())
            .group_by(ModelVersion.model_name, ModelVersion.kind).order_by(ModelVersion.model_name, ModelVersion.kind)
        )
    ]
