"""Operations figures, read when asked: Prometheus text at /metrics, JSON for the dashboard.

The database is the source of truth: API processes keep no counters that a restart would lose,
and every figure is computed from the database (and the broker's queue lengths) when Prometheus
scrapes. `read_figures` reads them all (the database in one short session); `/metrics` writes them in
Prometheus's text format and `/dashboard/data` (routes/dashboard.py) as JSON, so the two never
disagree. No subject or request ids in labels: only models, statuses, queues and metric names.
docs/operations.md describes each metric.
"""

import logging
import math
from datetime import datetime, timedelta

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import String, cast, func, select
from sqlalchemy.orm import Session

from service.api.deps import SessionDep, SettingsDep
from service.core.models import (
    AuditEntry,
    Batch,
    BatchStatus,
    Evaluation,
    ForgetRequest,
    ForgetRequestSample,
    Model,
    ModelVersion,
    RequestStatus,
    as_utc,
    utcnow,
)
from service.core.settings import Settings

log = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])

OPEN = (RequestStatus.received, RequestStatus.pending, RequestStatus.batched)
DUE_SOON = timedelta(days=7)
# Upper bounds of the batch duration histogram, in seconds: ten seconds (the digits CNN on a GPU)
# to four hours (a large model on a slow card).
DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
BROKER_TIMEOUT_SECONDS = 2


def _seconds_between(session: Session, start, end):
    """A SQL expression for `end - start` in seconds, on PostgreSQL and on SQLite."""
    if session.get_bind().dialect.name == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return func.extract("epoch", end - start)


def queue_lengths(settings: Settings) -> dict[str, int] | None:
    """Messages waiting in each Celery queue ({queue: count}), None when the broker is unreachable.

    Asks the broker through kombu, as Celery does: on Redis that is the length of the queue's
    lists (one per priority step), on the filesystem broker the count of the queue's message files.
    """
    from kombu import Connection
    from kombu.exceptions import ChannelError

    from service.core.tasks import CONTROL_QUEUE, GPU_QUEUE, broker_transport_options

    options = {**broker_transport_options(settings), "socket_connect_timeout": BROKER_TIMEOUT_SECONDS,
               "socket_timeout": BROKER_TIMEOUT_SECONDS, "max_retries": 0}
    lengths = {}
    try:
        with Connection(settings.broker_url, transport_options=options,
                        connect_timeout=BROKER_TIMEOUT_SECONDS) as connection:
            channel = connection.default_channel
            for queue in (GPU_QUEUE, CONTROL_QUEUE):
                try:
                    lengths[queue] = channel.queue_declare(queue, passive=True).message_count
                except ChannelError:  # a queue nothing was ever sent to (Redis keeps no empty lists)
                    lengths[queue] = 0
    except Exception as exc:  # noqa: BLE001 -- any failure means "unknown", not a failed scrape
        log.warning("metrics: broker unreachable: %s", exc)
        return None
    return lengths


def _newest_evaluation(session: Session, version_id: int) -> Evaluation | None:
    return session.scalars(
        select(Evaluation).where(Evaluation.version_id == version_id)
        .order_by(Evaluation.created_at.desc(), Evaluation.id.desc()).limit(1)
    ).first()


def _numbers(values: dict) -> dict[str, float]:
    # Evaluations are JSON written by the worker; keep the figures that are numbers.
    return {key: float(value) for key, value in values.items()
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)}


def read_operations(session: Session, now: datetime | None = None) -> dict:
    """Every figure the database holds, as plain JSON-ready data."""
    now = now or utcnow()
    figures: dict = {"generated_at": now.isoformat()}

    figures["requests"] = [
        {"model": model, "status": status.value, "count": count}
        for model, status, count in session.execute(
            select(ForgetRequest.model_name, ForgetRequest.status, func.count())
            .group_by(ForgetRequest.model_name, ForgetRequest.status)
            .order_by(ForgetRequest.model_name, ForgetRequest.status)
        )
    ]

    figures["due"] = [
        {"model": model, "past_due": overdue, "due_soon": soon,
         "oldest_open_age_seconds": (now - as_utc(first_received)).total_seconds()}
        for model, first_received, overdue, soon in session.execute(
            select(ForgetRequest.model_name, func.min(ForgetRequest.received_at),
                   func.count().filter(ForgetRequest.due_at < now),
                   func.count().filter(ForgetRequest.due_at < now + DUE_SOON))
            .where(ForgetRequest.status.in_(OPEN)).group_by(ForgetRequest.model_name)
            .order_by(ForgetRequest.model_name)
        )
    ]

    # The batch policy counts samples, not requests: this is what it compares with min_samples.
    figures["pending_samples"] = [
        {"model": model, "count": count}
        for model, count in session.execute(
            select(ForgetRequest.model_name, func.count(func.distinct(ForgetRequestSample.sample_id)))
            .join(ForgetRequestSample, ForgetRequestSample.request_id == ForgetRequest.id)
            .where(ForgetRequest.status == RequestStatus.pending)
            .group_by(ForgetRequest.model_name).order_by(ForgetRequest.model_name)
        )
    ]

    figures["batches"] = [
        {"model": model, "status": status.value, "count": count}
        for model, status, count in session.execute(
            select(Batch.model_name, Batch.status, func.count())
            .group_by(Batch.model_name, Batch.status).order_by(Batch.model_name, Batch.status)
        )
    ]

    figures["batch_durations"] = _batch_durations(session)

    # Every batch.* entry of the audit log per model: claimed, held (the quality gate), approved,
    # discarded, attempt_failed, failed, lease_taken_over, completed. The log is append-only, so
    # these only grow: counters whose rate is "holds per day" and so on.
    figures["batch_events"] = [
        {"model": model, "event": action.removeprefix("batch."), "count": count}
        for model, action, count in session.execute(
            select(Batch.model_name, AuditEntry.action, func.count())
            .join(Batch, AuditEntry.object_id == cast(Batch.id, String))
            .where(AuditEntry.object_type == "batch", AuditEntry.action.like("batch.%"))
            .group_by(Batch.model_name, AuditEntry.action).order_by(Batch.model_name, AuditEntry.action)
        )
    ]

    figures["held_batches"] = [
        {"model": model, "batch_id": batch_id, "held_seconds": (now - as_utc(created)).total_seconds(),
         "reason": reason}
        for model, batch_id, created, reason in session.execute(
            select(Batch.model_name, Batch.id, Batch.created_at, Batch.hold_reason)
            .where(Batch.status == BatchStatus.held).order_by(Batch.id)
        )
    ]

    figures["leases"] = [
        {"model": model, "batch_id": batch_id, "owner": owner, "attempt": attempts,
         "remaining_seconds": (as_utc(expires) - now).total_seconds() if expires else None}
        for model, batch_id, owner, attempts, expires in session.execute(
            select(Batch.model_name, Batch.id, Batch.lease_owner, Batch.attempts, Batch.lease_expires_at)
            .where(Batch.status == BatchStatus.running).order_by(Batch.model_name)
        )
    ]

    figures["deployments"] = []
    for model in session.scalars(select(Model).where(Model.deployed_version_id.is_not(None)).order_by(Model.name)):
        evaluation = _newest_evaluation(session, model.deployed_version_id)
        figures["deployments"].append({
            "model": model.name,
            "version_id": model.deployed_version_id,
            "evaluation": None if evaluation is None else {
                "id": evaluation.id,
                "reference_id": evaluation.reference_id,
                "age_seconds": (now - as_utc(evaluation.created_at)).total_seconds(),
                "metrics": _numbers(evaluation.metrics),
                "reference_metrics": _numbers(evaluation.reference_metrics),
                "gaps": _numbers(evaluation.gaps),
            },
        })

    figures["versions"] = [
        {"model": model, "kind": kind.value, "count": count}
        for model, kind, count in session.execute(
            select(ModelVersion.model_name, ModelVersion.kind, func.count())
            .group_by(ModelVersion.model_name, ModelVersion.kind).order_by(ModelVersion.model_name, ModelVersion.kind)
        )
    ]
    return figures


def read_figures(session: Session, settings: Settings) -> dict:
    """The database's figures, then the broker's."""
    figures = read_operations(session)
    # End the read before asking the broker: no connection (on SQLite, no lock) held meanwhile.
    session.rollback()
    lengths = queue_lengths(settings)
    figures["broker"] = {"transport": settings.broker_url.split("://", 1)[0], "up": lengths is not None,
                         "queues": lengths or {}}
    return figures


def _batch_durations(session: Session) -> list[dict]:
    """Per model: a cumulative histogram of completed batches' wall time (claim to deployment,
    retries included), their count and sum, and the newest one's duration."""
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
        {"model": model, "count": count, "sum_seconds": float(total or 0.0),
         "buckets": [{"le": bound, "count": within} for bound, within in zip(DURATION_BUCKETS, cumulative)],
         "last_seconds": float(last[model])}
        for model, count, total, *cumulative in rows
    ]


class OperationsCollector:
    """Writes `read_figures`' figures as Prometheus metric families."""

    def __init__(self, figures: dict):
        self.figures = figures

    def collect(self):
        f = self.figures
        requests = GaugeMetricFamily("qforget_forget_requests", "Forget requests by model and status.",
                                     labels=["model", "status"])
        for row in f["requests"]:
            requests.add_metric([row["model"], row["status"]], row["count"])
        yield requests

        past_due = GaugeMetricFamily("qforget_forget_requests_past_due",
                                     "Open forget requests past their GDPR due date.", labels=["model"])
        due_soon = GaugeMetricFamily("qforget_forget_requests_due_soon",
                                     "Open forget requests due within 7 days (past due included).", labels=["model"])
        oldest = GaugeMetricFamily("qforget_oldest_open_request_age_seconds",
                                   "Age of the oldest open forget request.", labels=["model"])
        for row in f["due"]:
            past_due.add_metric([row["model"]], row["past_due"])
            due_soon.add_metric([row["model"]], row["due_soon"])
            oldest.add_metric([row["model"]], row["oldest_open_age_seconds"])
        yield from (past_due, due_soon, oldest)

        pending_samples = GaugeMetricFamily("qforget_pending_samples",
                                            "Samples in pending forget requests (what the batch policy counts).",
                                            labels=["model"])
        for row in f["pending_samples"]:
            pending_samples.add_metric([row["model"]], row["count"])
        yield pending_samples

        broker_up = GaugeMetricFamily("qforget_broker_up", "1 when the broker answered this scrape, else 0.",
                                      labels=["transport"])
        broker_up.add_metric([f["broker"]["transport"]], 1 if f["broker"]["up"] else 0)
        queue = GaugeMetricFamily("qforget_queue_messages", "Messages waiting in the Celery queue "
                                  "(absent when the broker did not answer).", labels=["queue"])
        for name, count in sorted(f["broker"]["queues"].items()):
            queue.add_metric([name], count)
        yield from (broker_up, queue)

        batches = GaugeMetricFamily("qforget_batches", "Unlearning batches by model and status "
                                    "(failed: given up after the last attempt; held: waiting for review).",
                                    labels=["model", "status"])
        for row in f["batches"]:
            batches.add_metric([row["model"], row["status"]], row["count"])
        yield batches

        duration = HistogramMetricFamily("qforget_batch_duration_seconds",
                                         "Wall time of completed batches, claim to deployment.", labels=["model"])
        last = GaugeMetricFamily("qforget_last_batch_duration_seconds",
                                 "Wall time of the newest completed batch.", labels=["model"])
        for row in f["batch_durations"]:
            buckets = [(str(float(b["le"])), b["count"]) for b in row["buckets"]] + [("+Inf", row["count"])]
            duration.add_metric([row["model"]], buckets, row["sum_seconds"])
            last.add_metric([row["model"]], row["last_seconds"])
        yield from (duration, last)

        events = CounterMetricFamily("qforget_batch_events", "Batch events in the audit log by model and kind "
                                     "(held: the quality gate held a version).", labels=["model", "event"])
        for row in f["batch_events"]:
            events.add_metric([row["model"], row["event"]], row["count"])
        yield events

        held_age = GaugeMetricFamily("qforget_oldest_held_batch_age_seconds",
                                     "Age of the oldest batch waiting for review.", labels=["model"])
        oldest_held: dict[str, float] = {}
        for row in f["held_batches"]:
            oldest_held[row["model"]] = max(oldest_held.get(row["model"], 0.0), row["held_seconds"])
        for model, seconds in oldest_held.items():
            held_age.add_metric([model], seconds)
        yield held_age

        lease = GaugeMetricFamily("qforget_batch_lease_remaining_seconds",
                                  "Seconds left on the running batch's lease (negative: expired, "
                                  "the worker is presumed dead).", labels=["model"])
        for row in f["leases"]:
            if row["remaining_seconds"] is not None:
                lease.add_metric([row["model"]], row["remaining_seconds"])
        yield lease

        deployed = GaugeMetricFamily("qforget_deployed_version", "Id of the deployed model version.",
                                     labels=["model"])
        figures = {
            "metrics": GaugeMetricFamily("qforget_deployed_metric_percent", "FA, RA, TA, MIA (and the membership "
                                         "AUCs) of the deployed version, newest evaluation.",
                                         labels=["model", "metric"]),
            "reference_metrics": GaugeMetricFamily("qforget_reference_metric_percent", "The same figures of the "
                                                   "retrain reference it was evaluated against.",
                                                   labels=["model", "metric"]),
            "gaps": GaugeMetricFamily("qforget_deployed_gap_percent", "Gap of the deployed version to its retrain "
                                      "reference per metric, and AG, newest evaluation.", labels=["model", "metric"]),
        }
        evaluation_age = GaugeMetricFamily("qforget_evaluation_age_seconds", "Age of the deployed version's newest "
                                           "evaluation (absent: not evaluated yet).", labels=["model"])
        for row in f["deployments"]:
            deployed.add_metric([row["model"]], row["version_id"])
            evaluation = row["evaluation"]
            if evaluation is None:
                continue
            evaluation_age.add_metric([row["model"]], evaluation["age_seconds"])
            for key, family in figures.items():
                for metric, value in sorted(evaluation[key].items()):
                    family.add_metric([row["model"], metric], value)
        yield from (deployed, *figures.values(), evaluation_age)

        versions = GaugeMetricFamily("qforget_model_versions", "Model versions by model and kind.",
                                     labels=["model", "kind"])
        for row in f["versions"]:
            versions.add_metric([row["model"], row["kind"]], row["count"])
        yield versions


@router.get("/metrics", include_in_schema=False)
def metrics(session: SessionDep, settings: SettingsDep) -> Response:
    """Prometheus text exposition of the service's figures, read from the database."""
    figures = read_figures(session, settings)
    registry = CollectorRegistry()
    registry.register(OperationsCollector(figures))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
