"""Reads of webhook deliveries, for the API."""

from datetime import datetime

from sqlalchemy import Connection, exists, func, select
from sqlalchemy.orm import Session

from service.core.models import DeliveryStatus, WebhookDelivery


def deliveries_page(
    session: Session,
    *,
    event_type: str | None = None,
    status: DeliveryStatus | None = None,
    request_id: str | None = None,
    limit: int,
    offset: int,
) -> tuple[list[WebhookDelivery], int]:
    """One page of the deliveries that match every filter given, newest first; and how many match."""
    conditions = []
    if event_type is not None:
        conditions.append(WebhookDelivery.event_type == event_type)
    if status is not None:
        conditions.append(WebhookDelivery.status == status)
    if request_id is not None:
        conditions.append(WebhookDelivery.request_id == request_id)
    count = session.scalar(select(func.count()).select_from(WebhookDelivery).where(*conditions))
    deliveries = session.scalars(
        select(WebhookDelivery).where(*conditions)
        .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc()).limit(limit).offset(offset)
    ).all()
    return list(deliveries), count


def find_delivery(session: Session, delivery_id: str) -> WebhookDelivery | None:
    return session.get(WebhookDelivery, delivery_id)


def has_due(connection: Connection, now: datetime) -> bool:
    """Whether a delivery waits for an attempt due at `now` (the scheduler sends the task only then)."""
    return bool(connection.scalar(select(exists().where(
        WebhookDelivery.status == DeliveryStatus.pending, WebhookDelivery.next_attempt_at <= now))))
