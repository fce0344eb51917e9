"""What a delivered event sets off: ON_DELIVERED maps an event type to a function run in the
transaction that records the delivery as delivered (service.webhooks.delivery). A 2xx answer is
the receiver's acknowledgement; a hook records what that acknowledgement means for the service.
"""

from collections.abc import Callable
from datetime import datetime

from sqlalchemy import update
from sqlalchemy.orm import Session

from service.core.audit_log import append_audit
from service.core.models import ForgetRequest, WebhookDelivery

ACTOR = "webhooks"


def acknowledge_erasure(session: Session, delivery: WebhookDelivery, now: datetime) -> None:
    """The data owner took in request.erased (which records to delete): the request records when,
    once, with an audit entry that names the delivery, not the subject."""
    if delivery.request_id is None:
        return
    acknowledged = session.execute(
        update(ForgetRequest)
        .where(ForgetRequest.id == delivery.request_id, ForgetRequest.erasure_acknowledged_at.is_(None))
        .values(erasure_acknowledged_at=now)
        .execution_options(synchronize_session=False)
    ).rowcount
    if acknowledged:
        append_audit(session, actor=ACTOR, action="request.erasure_acknowledged", object_type="forget_request",
                     object_id=delivery.request_id,
                     details={"delivery_id": delivery.id, "status_code": delivery.last_status_code})


ON_DELIVERED: dict[str, Callable[[Session, WebhookDelivery, datetime], None]] = {
    "request.erased": acknowledge_erasure,
}
