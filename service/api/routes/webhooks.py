"""Webhook deliveries (docs/webhooks.md): what was sent to the endpoint, each attempt and its answer,
never the body; an admin sends a failed one again."""

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from service.api.deps import ActorDep, AdminDep, AuditorDep, SessionDep
from service.api.schemas import (
    AUTH_ERRORS,
    DATABASE_UNAVAILABLE,
    NO_NUL,
    DigitsOnly,
    ErrorPublic,
    Page,
    ProblemPublic,
    UtcDatetime,
)
from service.core.models import DeliveryStatus
from service.webhooks import delivery as deliveries
from service.webhooks.queries import deliveries_page, find_delivery

router = APIRouter(prefix="/webhooks/deliveries", tags=["webhooks"], responses={**AUTH_ERRORS, **DATABASE_UNAVAILABLE})

NOT_FOUND = {404: {"model": ErrorPublic, "description": "No webhook delivery has this id."}}
DeliveryId = Annotated[str, Path(max_length=64, pattern=NO_NUL)]


class DeliveryAttemptPublic(BaseModel):
    at: UtcDatetime
    status_code: int | None = Field(description="The receiver's HTTP status; None: no answer (refused, timed out).")
    error: str | None = Field(description="Why the attempt failed; None: delivered.")
    duration_ms: float


class WebhookDeliveryPublic(BaseModel):
    # Read from a WebhookDelivery row.
    model_config = ConfigDict(from_attributes=True)

    id: str = Field(description="The webhook-id header, the same on every attempt.")
    event_type: str
    request_id: str | None
    status: DeliveryStatus
    attempts: int = Field(description="Attempts since it was recorded or last retried.")
    next_attempt_at: UtcDatetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: UtcDatetime
    delivered_at: UtcDatetime | None
    failed_at: UtcDatetime | None
    payload_sha256: str = Field(description="The sha256 of the body sent: it stays when the body is cleared.")
    body_kept: bool = Field(description="Whether the body is still stored (until delivered or abandoned).")
    attempt_log: list[DeliveryAttemptPublic] = Field(description="Every attempt, oldest first.")


@router.get("", response_model=Page[WebhookDeliveryPublic], responses={422: {"model": ProblemPublic}})
def list_deliveries(
    session: SessionDep,
    caller: AuditorDep,
    event_type: Annotated[str | None, Query(min_length=1, max_length=64, pattern=NO_NUL)] = None,
    status: DeliveryStatus | None = None,
    request_id: Annotated[str | None, Query(min_length=1, max_length=36, pattern=NO_NUL)] = None,
    limit: Annotated[int, Query(ge=1, le=500), DigitsOnly] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1), DigitsOnly] = 0,
) -> Page[WebhookDeliveryPublic]:
    """List webhook deliveries, newest first, filtered by event type, status and forget request."""
    found, count = deliveries_page(session, event_type=event_type, status=status, request_id=request_id,
                                   limit=limit, offset=offset)
    return Page[WebhookDeliveryPublic](data=[WebhookDeliveryPublic.model_validate(d) for d in found], count=count)


@router.get("/{delivery_id}", response_model=WebhookDeliveryPublic, responses=NOT_FOUND)
def get_delivery(session: SessionDep, caller: AuditorDep, delivery_id: DeliveryId) -> WebhookDeliveryPublic:
    """One delivery: its status and every attempt, without the body."""
    found = find_delivery(session, delivery_id)
    if found is None:
        raise HTTPException(status_code=404, detail=f"webhook delivery {delivery_id!r} not found")
    return WebhookDeliveryPublic.model_validate(found)


@router.post(
    "/{delivery_id}/retry",
    response_model=WebhookDeliveryPublic,
    responses={**NOT_FOUND, 409: {"model": ErrorPublic, "description": "It is not failed, or its body was cleared."}},
)
def retry_delivery(session: SessionDep, caller: AdminDep, actor: ActorDep,
                   delivery_id: DeliveryId) -> WebhookDeliveryPublic:
    """Send a failed delivery again, with a new round of attempts."""
    try:
        retried = deliveries.retry(session, delivery_id, actor)
        session.commit()
    except deliveries.RetryRefused as error:
        raise HTTPException(status_code=404 if isinstance(error, deliveries.UnknownDelivery) else 409,
                            detail=str(error)) from None
    return WebhookDeliveryPublic.model_validate(retried)
