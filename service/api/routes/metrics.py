"""Prometheus metrics, computed from the database when Prometheus scrapes (the database is the
source of truth; API processes keep no counters that a restart would lose). No subject or
request ids in labels: only models, statuses and metric names."""

from datetime import timedelta

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from service.models import (
    Batch,
    BatchStatus,
    Evaluation,
    ForgetRequest,
    Model,
    ModelVersion,
    RequestStatus,
    as_utc,
    utcnow,
)

router = APIRouter(tags=["operations"])

OPEN = (RequestStatus.received, RequestStatus.pending, RequestStatus.batched)
DUE_SOON = timedelta(days=7)


class DatabaseCollector:
    """Reads every figure in one short transaction per scrape."""

    def __init__(self, session_factory):
        self.session_factory = session_factory

    def collect(self):
        now = utcnow()
        with self.session_factory() as session:
            requests = GaugeMetricFamily("qforget_forget_requests", "Forget requests by model and status.",
                                         labels=["model", "status"])
            for model, status, count in session.execute(
                select(ForgetRequest.model_name, ForgetRequest.status, func.count())
                .group_by(ForgetRequest.model_name, ForgetRequest.status)
            ):
                requests.add_metric([model, status.value], count)
            yield requests

            past_due = GaugeMetricFamily("qforget_forget_requests_past_due",
                                         "Open forget requests past their GDPR due date.", labels=["model"])
            due_soon = GaugeMetricFamily("qforget_forget_requests_due_soon",
                                         "Open forget requests due within 7 days.", labels=["model"])
            oldest = GaugeMetricFamily("qforget_oldest_open_request_age_seconds",
                                       "Age of the oldest open forget request.", labels=["model"])
            for model, earliest_due, first_received, overdue, soon in session.execute(
                select(ForgetRequest.model_name, func.min(ForgetRequest.due_at), func.min(ForgetRequest.received_at),
                       func.count().filter(ForgetRequest.due_at < now),
                       func.count().filter(ForgetRequest.due_at < now + DUE_SOON))
                .where(ForgetRequest.status.in_(OPEN)).group_by(ForgetRequest.model_name)
            ):
                past_due.add_metric([model], overdue)
                due_soon.add_metric([model], soon)
                oldest.add_metric([model], (now - as_utc(first_received)).total_seconds())
            yield from (past_due, due_soon, oldest)

            batches = GaugeMetricFamily("qforget_batches", "Unlearning batches by model and status "
                                        "(failed: given up after the last attempt; held: waiting for review).",
                                        labels=["model", "status"])
            for model, status, count in session.execute(
                select(Batch.model_name, Batch.status, func.count()).group_by(Batch.model_name, Batch.status)
            ):
                batches.add_metric([model, status.value], count)
            yield batches

            lease = GaugeMetricFamily("qforget_batch_lease_remaining_seconds",
                                      "Seconds left on the running batch's lease (negative: expired, "
                                      "the worker is presumed dead).", labels=["model"])
            for model, expires in session.execute(
                select(Batch.model_name, Batch.lease_expires_at).where(Batch.status == BatchStatus.running)
            ):
                lease.add_metric([model], (as_utc(expires) - now).total_seconds())
            yield lease

            duration = GaugeMetricFamily("qforget_last_batch_duration_seconds",
                                         "Wall time of the newest completed batch.", labels=["model"])
            newest = (select(Batch.model_name, func.max(Batch.id).label("id"))
                      .where(Batch.status == BatchStatus.completed).group_by(Batch.model_name).subquery())
            for batch in session.scalars(select(Batch).join(newest, Batch.id == newest.c.id)):
                seconds = (as_utc(batch.finished_at) - as_utc(batch.created_at)).total_seconds()
                duration.add_metric([batch.model_name], seconds)
            yield duration

            deployed = GaugeMetricFamily("qforget_deployed_version", "Id of the deployed model version.",
                                         labels=["model"])
            gaps = GaugeMetricFamily("qforget_deployed_gap_percent",
                                     "Gap of the deployed version to its retrain reference, newest evaluation.",
                                     labels=["model", "metric"])
            for model in session.scalars(select(Model).where(Model.deployed_version_id.is_not(None))):
                deployed.add_metric([model.name], model.deployed_version_id)
                evaluation = session.scalars(
                    select(Evaluation).where(Evaluation.version_id == model.deployed_version_id)
                    .order_by(Evaluation.id.desc()).limit(1)).first()
                for metric, value in (evaluation.gaps.items() if evaluation else ()):
                    gaps.add_metric([model.name, metric], value)
            yield from (deployed, gaps)

            versions = GaugeMetricFamily("qforget_model_versions", "Model versions by model and kind.",
                                         labels=["model", "kind"])
            for model, kind, count in session.execute(
                select(ModelVersion.model_name, ModelVersion.kind, func.count())
                .group_by(ModelVersion.model_name, ModelVersion.kind)
            ):
                versions.add_metric([model, kind.value], count)
            yield versions


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus text exposition of the service's figures, read from the database."""
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(request.app.state.session_factory))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
