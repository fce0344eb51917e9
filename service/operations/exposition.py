"""The operations figures in Prometheus's text format (docs/operations.md describes each metric)."""

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from service.operations.figures import BrokerFigures, DatabaseFigures, OperationsFigures

CONTENT_TYPE = CONTENT_TYPE_LATEST


def prometheus_text(figures: OperationsFigures) -> bytes:
    """`figures` as a Prometheus text exposition."""
    registry = CollectorRegistry()
    registry.register(OperationsCollector(figures))
    return generate_latest(registry)


class OperationsCollector:
    """Writes the figures as Prometheus metric families."""

    def __init__(self, figures: OperationsFigures):
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        database, broker = self.figures.database, self.figures.broker
        yield from _request_families(database)
        yield from _broker_families(broker)
        yield from _batch_families(database)
        yield from _deployment_families(database)


def _request_families(database: DatabaseFigures) -> Iterator[Metric]:
    requests = GaugeMetricFamily("qforget_forget_requests", "Forget requests by model and status.",
                                 labels=["model", "status"])
    for row in database.requests:
        requests.add_metric([row.model, row.status], row.count)
    yield requests

    past_due = GaugeMetricFamily("qforget_forget_requests_past_due",
                                 "Open forget requests past their GDPR due date.", labels=["model"])
    due_soon = GaugeMetricFamily("qforget_forget_requests_due_soon",
                                 "Open forget requests due within 7 days (past due included).", labels=["model"])
    oldest = GaugeMetricFamily("qforget_oldest_open_request_age_seconds",
                               "Age of the oldest open forget request.", labels=["model"])
    for row in database.due:
        past_due.add_metric([row.model], row.past_due)
        due_soon.add_metric([row.model], row.due_soon)
        oldest.add_metric([row.model], row.oldest_open_age_seconds)
    yield from (past_due, due_soon, oldest)

    pending_samples = GaugeMetricFamily("qforget_pending_samples",
                                        "Samples in pending forget requests (what the batch policy counts).",
                                        labels=["model"])
    for row in database.pending_samples:
        pending_samples.add_metric([row.model], row.count)
    yield pending_samples


def _broker_families(broker: BrokerFigures) -> Iterator[Metric]:
    broker_up = GaugeMetricFamily("qforget_broker_up", "1 when the broker answered this scrape, else 0.",
                                  labels=["transport"])
    broker_up.add_metric([broker.transport], 1 if broker.up else 0)
    queue = GaugeMetricFamily("qforget_queue_messages", "Messages waiting in the Celery queue "
                              "(absent when the broker did not answer).", labels=["queue"])
    for name, count in sorted(broker.queues.items()):
        queue.add_metric([name], count)
    yield from (broker_up, queue)


def _batch_families(database: DatabaseFigures) -> Iterator[Metric]:
    batches = GaugeMetricFamily("qforget_batches", "Unlearning batches by model and status "
                                "(failed: given up after the last attempt; held: waiting for review).",
                                labels=["model", "status"])
    for row in database.batches:
        batches.add_metric([row.model, row.status], row.count)
    yield batches

    duration = HistogramMetricFamily("qforget_batch_duration_seconds",
                                     "Wall time of completed batches, claim to deployment.", labels=["model"])
    last = GaugeMetricFamily("qforget_last_batch_duration_seconds",
                             "Wall time of the newest completed batch.", labels=["model"])
    for row in database.batch_durations:
        buckets = [(str(float(bucket.le)), bucket.count) for bucket in row.buckets] + [("+Inf", row.count)]
        duration.add_metric([row.model], buckets, row.sum_seconds)
        last.add_metric([row.model], row.last_seconds)
    yield from (duration, last)

    events = CounterMetricFamily("qforget_batch_events", "Batch events in the audit log by model and kind "
                                 "(held: the quality gate held a version).", labels=["model", "event"])
    for row in database.batch_events:
        events.add_metric([row.model, row.event], row.count)
    yield events

    held_age = GaugeMetricFamily("qforget_oldest_held_batch_age_seconds",
                                 "Age of the oldest batch waiting for review.", labels=["model"])
    oldest_held: dict[str, float] = {}
    for row in database.held_batches:
        oldest_held[row.model] = max(oldest_held.get(row.model, 0.0), row.held_seconds)
    for model, seconds in oldest_held.items():
        held_age.add_metric([model], seconds)
    yield held_age

    lease = GaugeMetricFamily("qforget_batch_lease_remaining_seconds",
                              "Seconds left on the running batch's lease (negative: expired, "
                              "the worker is presumed dead).", labels=["model"])
    for row in database.leases:
        if row.remaining_seconds is not None:
            lease.add_metric([row.model], row.remaining_seconds)
    yield lease


def _deployment_families(database: DatabaseFigures) -> Iterator[Metric]:
    deployed = GaugeMetricFamily("qforget_deployed_version", "Id of the deployed model version.",
                                 labels=["model"])
    deployed_metrics = GaugeMetricFamily("qforget_deployed_metric_percent", "FA, RA, TA, MIA, MIA_sd (MIA's spread "
                                         "between attacker draws; and the membership AUCs) of the deployed version, "
                                         "newest evaluation.",
                                         labels=["model", "metric"])
    reference_metrics = GaugeMetricFamily("qforget_reference_metric_percent", "The same figures of the "
                                          "retrain reference it was evaluated against.", labels=["model", "metric"])
    gaps = GaugeMetricFamily("qforget_deployed_gap_percent", "Gap of the deployed version to its retrain "
                             "reference per metric, and AG, newest evaluation.", labels=["model", "metric"])
    evaluation_age = GaugeMetricFamily("qforget_evaluation_age_seconds", "Age of the deployed version's newest "
                                       "evaluation (absent: not evaluated yet).", labels=["model"])
    # Interim figures must not pass for the audit's: an alert or a panel can tell them apart.
    evaluation_approximate = GaugeMetricFamily("qforget_evaluation_approximate", "1 when that evaluation is against "
                                               "an approximate reference (a coreset's; interim figures, docs/audit.md), "
                                               "else 0.", labels=["model"])
    for row in database.deployments:
        deployed.add_metric([row.model], row.version_id)
        evaluation = row.evaluation
        if evaluation is None:
            continue
        evaluation_age.add_metric([row.model], evaluation.age_seconds)
        evaluation_approximate.add_metric([row.model], int(evaluation.approximate))
        for family, values in ((deployed_metrics, evaluation.metrics),
                               (reference_metrics, evaluation.reference_metrics), (gaps, evaluation.gaps)):
            for metric, value in sorted(values.items()):
                family.add_metric([row.model, metric], value)
    yield from (deployed, deployed_metrics, reference_metrics, gaps, evaluation_age, evaluation_approximate)

    versions = GaugeMetricFamily("qforget_model_versions", "Model versions by model and kind.",
                                 labels=["model", "kind"])
    for row in database.versions:
        versions.add_metric([row.model, row.kind], row.count)
    yield versions
