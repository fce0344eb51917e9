"""Reads of models, their versions with lineage, and the batches that made them."""

from sqlalchemy import Row, Select, func, select
from sqlalchemy.orm import Session

from service.core.models import Batch, BatchStatus, ForgetRequestPart, Model, ModelVersion, VersionKind


def find_model(session: Session, name: str, *, for_update: bool = False) -> Model | None:
    """The model named `name`, or None; `for_update` locks its row until the transaction ends."""
    return session.get(Model, name, with_for_update=for_update)


def find_version(session: Session, version_id: int) -> ModelVersion | None:
    return session.get(ModelVersion, version_id)


def deployed_version(session: Session, model: Model) -> ModelVersion | None:
    """The version the model serves, or None before its first deployment."""
    if model.deployed_version_id is None:
        return None
    return session.get(ModelVersion, model.deployed_version_id)


# A version's columns but its excluded sample ids (a list that grows with every forgotten sample).
_VERSION_COLUMNS = [column for column in ModelVersion.__table__.columns if column.key != "excluded_sample_ids"]


def _versions_with_lineage() -> Select:
    """Rows of a version's columns, `deployed` (whether it is its model's deployment) and
    `excluded_sample_count` (how many samples it was made without, counted by the database)."""
    deployed = Model.deployed_version_id.is_not_distinct_from(ModelVersion.id).label("deployed")
    excluded = func.coalesce(func.json_array_length(ModelVersion.excluded_sample_ids), 0)
    return (
        select(*_VERSION_COLUMNS, deployed, excluded.label("excluded_sample_count"))
        .join(Model, Model.name == ModelVersion.model_name)
    )


def versions_page(
    session: Session, *, model_name: str | None = None, kind: VersionKind | None = None, limit: int, offset: int
) -> tuple[list[Row], int]:
    """One page of versions with their lineage (rows as `find_version_with_lineage`'s), newest
    first; and how many match in all."""
    conditions = []
    if model_name is not None:
        conditions.append(ModelVersion.model_name == model_name)
    if kind is not None:
        conditions.append(ModelVersion.kind == kind)
    count = session.scalar(select(func.count()).select_from(ModelVersion).where(*conditions))
    rows = session.execute(
        _versions_with_lineage().where(*conditions).order_by(ModelVersion.id.desc()).limit(limit).offset(offset)
    ).all()
    return list(rows), count


def find_version_with_lineage(session: Session, version_id: int) -> Row | None:
    """A row of the version's columns (but its excluded sample ids), `deployed` and
    `excluded_sample_count`; None for an unknown id."""
    return session.execute(_versions_with_lineage().where(ModelVersion.id == version_id)).first()


def _batches() -> Select:
    """Rows of a batch's columns and `request_count`, how many forget requests it runs (a part each)."""
    request_count = (
        select(func.count()).where(ForgetRequestPart.batch_id == Batch.id).correlate(Batch).scalar_subquery()
    )
    return select(Batch.__table__, request_count.label("request_count"))


def batches_page(
    session: Session, *, model_name: str | None = None, status: BatchStatus | None = None, limit: int, offset: int
) -> tuple[list[Row], int]:
    """One page of batches (rows as `find_batch`'s), newest first; and how many match in all."""
    conditions = []
    if model_name is not None:
        conditions.append(Batch.model_name == model_name)
    if status is not None:
        conditions.append(Batch.status == status)
    count = session.scalar(select(func.count()).select_from(Batch).where(*conditions))
    rows = session.execute(_batches().where(*conditions).order_by(Batch.id.desc()).limit(limit).offset(offset)).all()
    return list(rows), count


def find_batch(session: Session, batch_id: int) -> Row | None:
    """A row of the batch's columns and `request_count`; None for an unknown id."""
    return session.execute(_batches().where(Batch.id == batch_id)).first()
