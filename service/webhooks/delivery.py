"""Delivering the outbox: claim the due deliveries, POST each, record the attempt.

A run claims at most `limit` due deliveries in a short transaction (FOR UPDATE SKIP LOCKED on
PostgreSQL, so concurrent runs take different rows; SQLite serialises every transaction) and
moves their next attempt past the time the run may take: a run that dies mid-way leaves them to a
later one, and no transaction is open while a POST waits on the network. Each answer is recorded in
its own transaction: 2xx delivers it (the body is cleared, ON_DELIVERED's hook runs), anything
else schedules the next attempt after QFORGET_WEBHOOK_BACKOFF_SECONDS * 2^(attempts-1) (at most
QFORGET_WEBHOOK_BACKOFF_MAX_SECONDS), and the QFORGET_WEBHOOK_MAX_ATTEMPTS-th failure fails it.
Delivery is at least once: a receiver drops a webhook-id it has seen.

When the endpoint cannot be reached at all (refused, timed out), the run stops there and gives the
rest of its claim back untried: one unreachable endpoint costs a run one timeout, not one per delivery.

Log lines name the delivery and its event type, never the body.
"""

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from service.core.audit_log import append_audit
from service.core.db import drop_deleted_content, transaction
from service.core.models import DeliveryStatus, WebhookDelivery, utcnow
from service.webhooks.config import WebhookConfig, webhook_config
from service.webhooks.hooks import ON_DELIVERED
from service.webhooks.outbox import NAMES_THE_SUBJECT, encode
from service.webhooks.signing import signature_headers

log = logging.getLogger(__name__)

# Deliveries one run claims; at the longest it takes this many timeouts.
DELIVERIES_PER_RUN = 20
USER_AGENT = "qforget-webhooks"


@dataclass(frozen=True)
class Claimed:
    id: str
    event_type: str
    payload: dict


@dataclass(frozen=True)
class Attempt:
    """One POST of a delivery and its answer."""

    delivery_id: str
    event_type: str
    status_code: int | None  # None: no answer (refused, timed out, ...)
    error: str | None  # None: delivered
    duration_ms: float
    unreachable: bool = False  # the endpoint could not be reached at all

    @property
    def delivered(self) -> bool:
        return self.error is None


def deliver_due(engine: Engine, *, now: datetime | None = None, limit: int = DELIVERIES_PER_RUN) -> list[Attempt]:
    """POST the deliveries due at `now` (default: the current time), at most `limit`; returns the
    attempts made. Nothing without an endpoint configured on the engine."""
    config = webhook_config(engine)
    if config is None:
        return []
    now = now or utcnow()
    claimed = _claim(engine, config, now, limit)
    attempts = []
    with httpx.Client(timeout=config.timeout_seconds, follow_redirects=False) as client:
        for position, delivery in enumerate(claimed):
            attempt = _post(client, config, delivery, now)
            _record(engine, config, attempt, now)
            attempts.append(attempt)
            if attempt.unreachable:
                _give_back(engine, [rest.id for rest in claimed[position + 1:]], now)
                break
    if any(attempt.delivered and attempt.event_type in NAMES_THE_SUBJECT for attempt in attempts):
        drop_deleted_content(engine)  # the cleared bodies named the subject
    return attempts


def _claim(engine: Engine, config: WebhookConfig, now: datetime, limit: int) -> list[Claimed]:
    # Past the time the whole run may take: no other run claims them meanwhile.
    claimed_until = now + timedelta(seconds=limit * config.timeout_seconds + 60)
    with transaction(engine) as session:
        rows = session.execute(
            select(WebhookDelivery.id, WebhookDelivery.event_type, WebhookDelivery.payload)
            .where(WebhookDelivery.status == DeliveryStatus.pending, WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        if rows:
            session.execute(update(WebhookDelivery).where(WebhookDelivery.id.in_([row.id for row in rows]))
                            .values(next_attempt_at=claimed_until))
    return [Claimed(row.id, row.event_type, row.payload) for row in rows]


def _post(client: httpx.Client, config: WebhookConfig, delivery: Claimed, now: datetime) -> Attempt:
    body = encode(delivery.payload)
    headers = {**signature_headers(config.key, delivery.id, int(now.timestamp()), body),
               "content-type": "application/json", "user-agent": USER_AGENT}
    started = time.monotonic()
    status_code, error, unreachable = None, None, False
    try:
        # The answer's body is not read: only its status counts.
        with client.stream("POST", config.url, content=body, headers=headers) as response:
            status_code = response.status_code
        if not 200 <= status_code < 300:
            error = f"HTTP {status_code}"
    except (httpx.ConnectError, httpx.TimeoutException) as exc:
        error, unreachable = f"{type(exc).__name__}: {exc}", True
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    duration_ms = round((time.monotonic() - started) * 1000, 1)
    return Attempt(delivery.id, delivery.event_type, status_code, error, duration_ms, unreachable)


def _record(engine: Engine, config: WebhookConfig, attempt: Attempt, now: datetime) -> None:
    with transaction(engine) as session:
        delivery = session.get(WebhookDelivery, attempt.delivery_id, with_for_update=True)
        if delivery is None or delivery.status != DeliveryStatus.pending:
            return  # recorded meanwhile by a run that claimed it after this one's claim ran out
        delivery.attempts += 1
        delivery.attempt_log = [*delivery.attempt_log, {"at": now.isoformat(), "status_code": attempt.status_code,
                                                        "error": attempt.error, "duration_ms": attempt.duration_ms}]
        delivery.last_status_code = attempt.status_code
        delivery.last_error = attempt.error
        if attempt.delivered:
            delivery.status = DeliveryStatus.delivered
            delivery.delivered_at = now
            delivery.next_attempt_at = None
            delivery.payload = None  # delivered: nothing here names the subject any more
            hook = ON_DELIVERED.get(delivery.event_type)
            if hook is not None:
                hook(session, delivery, now)
            log.info("webhook %s (%s) delivered", delivery.id, delivery.event_type)
        elif delivery.attempts >= config.max_attempts:
            delivery.status = DeliveryStatus.failed
            delivery.failed_at = now
            delivery.next_attempt_at = None
            log.warning("webhook %s (%s) failed after %s attempts: %s", delivery.id, delivery.event_type,
                        delivery.attempts, attempt.error)
        else:
            delivery.next_attempt_at = now + config.backoff(delivery.attempts)
            log.info("webhook %s (%s) attempt %s failed (%s); next at %s", delivery.id, delivery.event_type,
                     delivery.attempts, attempt.error, delivery.next_attempt_at.isoformat())


def _give_back(engine: Engine, delivery_ids: list[str], now: datetime) -> None:
    """Claimed but not tried: due again at once, no attempt counted."""
    if not delivery_ids:
        return
    with transaction(engine) as session:
        session.execute(update(WebhookDelivery)
                        .where(WebhookDelivery.id.in_(delivery_ids), WebhookDelivery.status == DeliveryStatus.pending)
                        .values(next_attempt_at=now))


class RetryRefused(Exception):
    """A retry asked of a delivery that is not failed, or whose body was cleared."""


class UnknownDelivery(RetryRefused):
    """No delivery has the id."""


def retry(session: Session, delivery_id: str, actor: str, now: datetime | None = None) -> WebhookDelivery:
    """An admin sends a failed delivery again: pending at once, with a new round of attempts (its
    attempt log keeps the old ones)."""
    delivery = session.get(WebhookDelivery, delivery_id, with_for_update=True)
    if delivery is None:
        raise UnknownDelivery(f"webhook delivery {delivery_id!r} not found")
    if delivery.status != DeliveryStatus.failed:
        raise RetryRefused(f"webhook delivery {delivery_id} is {delivery.status.value}, not failed")
    if delivery.payload is None:
        raise RetryRefused(f"webhook delivery {delivery_id} was abandoned: its body was cleared "
                           "QFORGET_WEBHOOK_FAILED_RETENTION_HOURS after its last attempt failed")
    delivery.status = DeliveryStatus.pending
    delivery.attempts = 0
    delivery.next_attempt_at = now or utcnow()
    delivery.failed_at = None
    append_audit(session, actor=actor, action="webhook.retried", object_type="webhook_delivery",
                 object_id=delivery.id, details={"event_type": delivery.event_type,
                                                 "attempts_before": len(delivery.attempt_log)})
    return delivery
