"""Deleting the artifact files of versions that still carry forgotten samples: after the retention
time, or at once for samples being erased."""

from datetime import timedelta
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from service.core.audit_log import append_audit
from service.core.db import transaction
from service.core.models import Model, ModelVersion, as_utc, utcnow
from service.core.settings import Settings
from service.requests.holdings import forgotten_by


def prune_artifacts(engine: Engine, settings: Settings, model_name: str, actor: str) -> list[int]:
    """Delete the files of versions that still carry forgotten samples, after the retention time.

    A version made before a sample was forgotten still holds what it learned from it; once the
    deployment has forgotten it (and the retention time for audit evidence has passed) the file
    goes. The row and its lineage stay. Returns the pruned version ids.
    """
    cutoff = utcnow() - timedelta(hours=settings.artifact_retention_hours)
    pruned = []
    with transaction(engine) as session:
        model = session.get(Model, model_name)
        forgotten_at = forgotten_by(session, model_name)
        versions = session.scalars(select(ModelVersion).where(
            ModelVersion.model_name == model_name, ModelVersion.artifact_deleted_at.is_(None),
            ModelVersion.id != model.deployed_version_id)).all()
        for version in versions:
            still_carried = [forgotten_at[i] for i in forgotten_at.keys() - set(version.excluded_sample_ids)]
            if still_carried and min(as_utc(t) for t in still_carried) <= cutoff:
                Path(version.artifact_path).unlink(missing_ok=True)
                version.artifact_deleted_at = utcnow()
                pruned.append(version.id)
        if pruned:
            append_audit(session, actor=actor, action="artifacts.deleted", object_type="model",
                         object_id=model_name, details={"version_ids": pruned})
    return pruned


def delete_artifacts_carrying(session: Session, dataset: str, sample_ids: list[int]) -> list[int]:
    """Delete the files of every version, of any model on the data set and of any kind, that carries
    one of these samples (was made with it: it is not among the version's excluded samples), and is
    deployed by no model. Returns their ids. The rows and their lineage stay."""
    wanted = set(sample_ids)
    deployed = select(Model.deployed_version_id).where(Model.deployed_version_id.is_not(None))
    versions = session.scalars(
        select(ModelVersion).join(Model, Model.name == ModelVersion.model_name)
        .where(Model.dataset == dataset, ModelVersion.artifact_deleted_at.is_(None), ModelVersion.id.not_in(deployed))
        .order_by(ModelVersion.id)
    ).all()
    deleted = []
    for version in versions:
        if wanted - set(version.excluded_sample_ids):
            Path(version.artifact_path).unlink(missing_ok=True)
            version.artifact_deleted_at = utcnow()
            deleted.append(version.id)
    return deleted
