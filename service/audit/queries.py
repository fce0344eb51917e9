"""Reads of the audit log and of the evaluations of versions against retrain references."""

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.core.models import AuditEntry, Evaluation, ModelVersion


def audit_entries_page(
    session: Session,
    *,
    action: str | None = None,
    object_type: str | None = None,
    object_id: str | None = None,
    limit: int,
    offset: int,
) -> tuple[list[AuditEntry], int]:
    """One page of the entries that match every filter given, in the chain's order (oldest
    first); and how many match in all."""
    conditions = []
    if action is not None:
        conditions.append(AuditEntry.action == action)
    if object_type is not None:
        conditions.append(AuditEntry.object_type == object_type)
    if object_id is not None:
        conditions.append(AuditEntry.object_id == object_id)
    count = session.scalar(select(func.count()).select_from(AuditEntry).where(*conditions))
    entries = session.scalars(
        select(AuditEntry).where(*conditions).order_by(AuditEntry.id).limit(limit).offset(offset)
    ).all()
    return list(entries), count


def matching_evaluation(session: Session, version: ModelVersion) -> Evaluation | None:
    """The version's newest evaluation against a reference that excludes exactly its samples."""
    excluded = set(version.excluded_sample_ids)
    evaluations = session.execute(
        select(Evaluation, ModelVersion.excluded_sample_ids)
        .join(ModelVersion, ModelVersion.id == Evaluation.reference_id)
        .where(Evaluation.version_id == version.id)
        .order_by(Evaluation.created_at.desc(), Evaluation.id.desc())
    ).all()
    return next((evaluation for evaluation, reference_excluded in evaluations
                 if set(reference_excluded) == excluded), None)


def newest_evaluation_of_model(session: Session, model_name: str) -> Evaluation | None:
    """The newest evaluation of any of the model's versions."""
    return session.scalars(
        select(Evaluation)
        .join(ModelVersion, ModelVersion.id == Evaluation.version_id)
        .where(ModelVersion.model_name == model_name)
        .order_by(Evaluation.created_at.desc(), Evaluation.id.desc())
        .limit(1)
    ).first()
