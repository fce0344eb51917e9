"""Celery tasks. Each reads its work from the database (the GPU tasks: a model's).

The engine (torch) is imported inside the task bodies so that the scheduler process, which only
sends dispatches, never loads it.
"""

import logging
from datetime import timedelta

from service.core.db import drop_deleted_content, get_engine, transaction
from service.core.logging_setup import bind_log_context
from service.core.models import utcnow
from service.core.settings import get_settings
from service.core.tasks import (
    DISPATCH_TASK,
    ERASE_TASK,
    INSTANT_TASK,
    REFERENCE_TASK,
    UNLEARN_TASK,
    WEBHOOK_TASK,
    redelivery_seconds,
)
from service.references.schedule import claim_requests_to_send, schedule_references
from service.requests import idempotency
from service.requests.erasure import requests_due
from service.requests.instant import awaiting_instant_stage
from service.webhooks import outbox
from service.webhooks.delivery import deliver_due
from service.webhooks.queries import has_due
from workers.batches.policy import BatchPolicy, due_models
from workers.celery_app import app

log = logging.getLogger(__name__)


@app.task(name=DISPATCH_TASK)
def dispatch() -> list[str]:
    """Wake a GPU worker for every model whose batch policy is met or whose batch was abandoned."""
    settings = get_settings()
    default = BatchPolicy(min_samples=settings.batch_min_samples,
                          max_wait_seconds=settings.batch_max_wait_seconds,
                          due_margin_days=settings.batch_due_margin_days)
    policies = {name: BatchPolicy(**{**default.model_dump(), **overrides})
                for name, overrides in settings.batch_policies.items()}
    with get_engine(settings, "scheduler").connect() as connection:
        due = due_models(connection, policies, default, utcnow(),
                         timedelta(seconds=settings.failed_batch_cooldown_seconds))
    for model_name in due:
        run_unlearning.delay(model_name)
    with get_engine(settings, "scheduler").connect() as connection:
        # The API's wake-up after filing may have been lost (a crash, the broker down): sent again.
        for model_name in awaiting_instant_stage(connection):
            take_instant_effect.apply_async((model_name,), expires=settings.scheduler_interval_seconds)
    dispatch_references()
    now = utcnow()
    with transaction(get_engine(settings, "scheduler")) as session:
        idempotency.prune_expired(session, now - timedelta(hours=settings.idempotency_retention_hours))
        abandoned = outbox.clear_abandoned(session, now - timedelta(hours=settings.webhook_failed_retention_hours))
        webhooks_due = bool(settings.webhook_url) and has_due(session.connection(), now)
        erasures_due = requests_due(session, now, timedelta(hours=settings.erasure_window_hours))
    if abandoned:
        drop_deleted_content(get_engine(settings, "scheduler"))  # their cleared bodies may have named subjects
    if webhooks_due:
        # A send older than one interval is superseded by the next tick's.
        deliver_webhooks.apply_async(expires=settings.scheduler_interval_seconds)
    if erasures_due:
        erase_copies.delay()
    return due


def dispatch_references() -> list[int]:
    """Ask for the retrain references the schedule says are due, and send the training task for
    every open reference request not sent yet (or lost). Returns the request ids sent."""
    settings = get_settings()
    now = utcnow()
    with transaction(get_engine(settings, "scheduler")) as session:
        schedule_references(session, settings.reference_every_versions, settings.reference_every_days, now)
        to_send = claim_requests_to_send(session, now, timedelta(seconds=redelivery_seconds(settings)))
    # Sent after the commit: a worker must find the request. A send that fails leaves the request
    # marked sent; it goes again after the redelivery time.
    for request_id, model_name in to_send:
        train_reference.delay(model_name, request_id)
    return [request_id for request_id, _ in to_send]


@app.task(name=WEBHOOK_TASK)
def deliver_webhooks() -> int:
    """POST the webhook deliveries that are due (service/webhooks/delivery.py); returns how many were tried."""
    return len(deliver_due(get_engine(get_settings(), "worker")))


@app.task(name=INSTANT_TASK)
def take_instant_effect(model_name: str) -> int | None:
    """Remove the samples of a semi-parametric model's new forget requests from its datastore and
    deploy that version (workers/instant.py); returns its id, None when nothing waited."""
    from workers.instant import take_instant_effect as take_effect
    from workers.runtime import configure_torch

    settings = get_settings()
    configure_torch(settings)
    return take_effect(get_engine(settings, "worker"), settings, model_name)


@app.task(name=UNLEARN_TASK)
def run_unlearning(model_name: str) -> int | None:
    """Claim the model's pending requests (or an expired batch), run Q-MUL, deploy the result."""
    from service.deployments.retention import prune_artifacts
    from workers.batches.claims import claim_batch, record_failure
    from workers.batches.run import run_batch
    from workers.runtime import WORKER_ID, configure_torch

    settings = get_settings()
    configure_torch(settings)
    engine = get_engine(settings, "worker")
    claimed = claim_batch(engine, settings, model_name)
    if claimed is None:
        return None
    # Every line logged from here on in this task (the run's own too) carries the ids.
    bind_log_context(model=model_name, batch_id=claimed.batch_id)
    log.info("batch %s claimed for model %s", claimed.batch_id, model_name)
    try:
        version_id = run_batch(engine, settings, claimed)
    except Exception as error:  # recorded on the batch; the scheduler retries it after a backoff
        log.exception("batch %s failed", claimed.batch_id)
        record_failure(engine, settings, claimed, error)
        return None
    log.info("batch %s finished: deployed version %s", claimed.batch_id, version_id, extra={"version_id": version_id})
    prune_artifacts(engine, settings, model_name, actor=f"worker:{WORKER_ID}")
    return version_id


@app.task(name=REFERENCE_TASK)
def train_reference(model_name: str, reference_request_id: int | None = None) -> int | None:
    """Train a retrain reference on the active samples and evaluate the deployment against it.

    With a reference request id (the scheduler's sends), the request is closed with the reference,
    and a request already closed is not trained again (a duplicate delivery). With
    QFORGET_APPROXIMATE_REFERENCE_FRACTION set, an approximate reference and an interim audit come
    first (interim_audit); a redelivery after it goes on to the full reference.
    """
    from workers.evaluation.deployment import evaluate_deployment, measure_approximation
    from workers.references.training import record_reference_failure
    from workers.references.training import train_reference as train
    from workers.runtime import configure_torch

    settings = get_settings()
    configure_torch(settings)
    engine = get_engine(settings, "worker")
    if reference_request_id is not None and settings.approximate_reference_fraction is not None:
        interim_audit(engine, settings, model_name, reference_request_id)
    try:
        reference_id = train(engine, settings, model_name, reference_request_id)
    except Exception as error:  # recorded on the request: sent again later, or closed after the last attempt
        log.exception("reference for model %s failed", model_name)
        if reference_request_id is not None:
            record_reference_failure(engine, settings, reference_request_id, error)
        return None
    if reference_id is None:
        return None
    log.info("reference version %s trained for model %s", reference_id, model_name,
             extra={"model": model_name, "version_id": reference_id})
    evaluation_id = evaluate_deployment(engine, settings, model_name)
    if evaluation_id is not None:
        measure_approximation(engine, evaluation_id)  # how far an interim audit was, if there was one
    return evaluation_id


def interim_audit(engine, settings, model_name: str, reference_request_id: int) -> int | None:
    """An approximate reference of the requested state, and the deployment evaluated against it, before
    the full reference (QFORGET_APPROXIMATE_REFERENCE_FRACTION; docs/audit.md). Returns the evaluation id.
    A failure here is logged and nothing more: the request stays open until the full reference is recorded."""
    from workers.evaluation.deployment import evaluate_deployment
    from workers.references.training import train_approximate_reference

    try:
        approximate_id = train_approximate_reference(engine, settings, model_name, reference_request_id)
        if approximate_id is None:
            return None
        log.info("approximate reference version %s trained for model %s", approximate_id, model_name,
                 extra={"model": model_name, "version_id": approximate_id})
        return evaluate_deployment(engine, settings, model_name)
    except Exception:
        log.exception("approximate reference for model %s failed; the full reference is trained all the same",
                      model_name)
        return None


@app.task(name=ERASE_TASK)
def erase_copies() -> list[str]:
    """Freeze the evidence and erase every copy of the samples of each request whose erasure window
    has passed (workers/erasure.py). Returns the request ids erased."""
    from workers.erasure import erase_due_requests

    return erase_due_requests(get_engine(get_settings(), "worker"), get_settings())
