"""The outbox: an event to send is a row of webhook_deliveries, written in the transaction of the
change it reports, so that an event is sent if and only if its change committed. The workers POST
the rows later (service.webhooks.delivery); nothing here talks to the network.

Where no endpoint is configured (service.webhooks.config) `emit` writes nothing and runs no statement.

The body is fixed when the event is recorded: the envelope {"type", "timestamp", "data"} as canonical
JSON (sorted keys, no spaces, UTF-8), whose sha256 is kept beside it. It may name a subject (the
data owner needs that to delete its records): it is cleared once the delivery is delivered or
abandoned (`clear_abandoned`), and only the sha256 stays. Nothing here logs it.
"""

import hashlib
import json
import secrets
from datetime import datetime

from sqlalchemy import insert, update
from sqlalchemy.orm import Session

from service.core.models import DeliveryStatus, WebhookDelivery, utcnow
from service.webhooks.config import webhook_config

# Every event the service sends (docs/webhooks.md). Each names its forget request as data["request_id"].
EVENT_TYPES = frozenset({
    "request.received",
    "request.extended",
    "request.withdrawn",
    "request.completed",
    "request.failed",
    "request.erased",
})

# The events whose body names the subject: once such a body is cleared, the database's files are
# rid of it too (service.core.db.drop_deleted_content).
NAMES_THE_SUBJECT = frozenset({"request.erased"})

_INSERT = insert(WebhookDelivery.__table__)


def enabled(session: Session) -> bool:
    """Whether the session's engine carries an endpoint: without one, events are not recorded."""
    return webhook_config(session.connection()) is not None


def emit(session: Session, event_type: str, data: dict) -> None:
    """Record one event for the endpoint in the caller's transaction (nothing without an endpoint)."""
    emit_many(session, [(event_type, data)])


def emit_many(session: Session, events: list[tuple[str, dict]]) -> None:
    """Record events, in order, in one statement whatever their number (the intake files many
    requests in one transaction)."""
    unknown = sorted({event_type for event_type, _ in events} - EVENT_TYPES)
    if unknown:  # refused with or without an endpoint: a misspelt type shows in every test
        raise ValueError(f"unknown webhook event type {unknown[0]!r} (known: {', '.join(sorted(EVENT_TYPES))})")
    if not events or not enabled(session):
        return
    now = utcnow()
    rows = []
    for event_type, data in events:
        body = encode({"type": event_type, "timestamp": now.isoformat(), "data": data})
        rows.append({
            "id": new_message_id(),
            "event_type": event_type,
            "request_id": data.get("request_id"),
            "payload": json.loads(body),
            "payload_sha256": hashlib.sha256(body).hexdigest(),
            "status": DeliveryStatus.pending,
            "attempts": 0,
            "attempt_log": [],
            "next_attempt_at": now,
            "created_at": now,
        })
    session.connection().execute(_INSERT, rows)


def encode(payload: dict) -> bytes:
    """The body POSTed for a payload: canonical JSON, the same bytes on every attempt."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def new_message_id() -> str:
    """A delivery's id, sent as webhook-id: unique, and the same on each attempt."""
    return f"msg_{secrets.token_hex(16)}"


def clear_abandoned(session: Session, failed_before: datetime) -> int:
    """Clear the body of every failed delivery that failed before `failed_before` (not retried
    within the retention): abandoned, it names no one any more. Returns how many."""
    result = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.status == DeliveryStatus.failed, WebhookDelivery.failed_at < failed_before,
               WebhookDelivery.payload.is_not(None))
        .values(payload=None)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount
