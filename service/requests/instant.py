"""Which semi-parametric models have forget-request parts waiting for their instant stage (their
samples still in the deployed datastore): the scheduler wakes the instant task for each."""

from sqlalchemy import Connection, select

from service.core.models import ForgetRequestPart, Model, RequestStatus


def awaiting_instant_stage(connection: Connection) -> list[str]:
    return list(connection.scalars(
        select(Model.name).distinct()
        .join(ForgetRequestPart, ForgetRequestPart.model_name == Model.name)
        .where(Model.semi_parametric, Model.deployed_version_id.is_not(None),
               ForgetRequestPart.instant_version_id.is_(None),
               ForgetRequestPart.status.in_((RequestStatus.pending, RequestStatus.batched)))
        .order_by(Model.name)
    ))
