"""The audit of a model's deployment: its newest evaluation against the retrain reference."""

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from sqlalchemy import select

from service.api.deps import SessionDep, SettingsDep
from service.api.schemas import DATABASE_UNAVAILABLE, NO_NUL, AuditPublic, ErrorPublic, EvaluationPublic
from service.models import Evaluation, Model, ModelVersion

router = APIRouter(prefix="/audit", tags=["audit"], responses=DATABASE_UNAVAILABLE)


@router.get(
    "",
    response_model=AuditPublic,
    responses={404: {"model": ErrorPublic, "description": "No model has this name."}},
)
def read_audit(
    session: SessionDep,
    settings: SettingsDep,
    model: Annotated[str | None, Query(min_length=1, max_length=64, pattern=NO_NUL)] = None,
) -> AuditPublic:
    """Get how far the deployed version is from a model retrained without the forgotten samples."""
    name = model or settings.default_model
    db_model = session.get(Model, name)
    if db_model is None:
        raise HTTPException(status_code=404, detail=f"model {name!r} not found")
    deployed = db_model.deployed_version_id
    # An evaluation of the deployed version if there is one, else the newest of any version.
    evaluation = session.scalars(
        select(Evaluation)
        .join(ModelVersion, ModelVersion.id == Evaluation.version_id)
        .where(ModelVersion.model_name == name)
        .order_by((Evaluation.version_id == deployed).desc(), Evaluation.created_at.desc(), Evaluation.id.desc())
        .limit(1)
    ).first()
    if evaluation is None:
        return AuditPublic(
            model=name,
            deployed_version_id=deployed,
            status="missing",
            message=f"no version of model {name!r} has been evaluated against a retrain reference yet",
            evaluation=None,
        )
    current = evaluation.version_id == deployed
    return AuditPublic(
        model=name,
        deployed_version_id=deployed,
        status="current" if current else "stale",
        message=(
            f"evaluation of the deployed version {deployed}"
            if current
            else f"the deployed version {deployed} has not been evaluated yet; this is the evaluation of "
            f"the earlier version {evaluation.version_id}"
        ),
        evaluation=EvaluationPublic(
            id=evaluation.id,
            version_id=evaluation.version_id,
            reference_id=evaluation.reference_id,
            metrics=evaluation.metrics,
            reference_metrics=evaluation.reference_metrics,
            gaps=evaluation.gaps,
            forget_count=evaluation.forget_count,
            retain_count=evaluation.retain_count,
            test_count=evaluation.test_count,
            computed_at=evaluation.created_at,
        ),
    )
