"""The audit: a deployment's newest evaluation against the retrain reference, and the audit log."""

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query
from sqlalchemy import func, select

from service.api.deps import SessionDep, SettingsDep, require_role
from service.api.schemas import (
    AUTH_ERRORS,
    DATABASE_UNAVAILABLE,
    NO_NUL,
    AuditEntriesPublic,
    AuditEntryPublic,
    AuditPublic,
    ChainReportPublic,
    ErrorPublic,
    EvaluationPublic,
    ProblemPublic,
)
from service.audit_log import verify_chain
from service.models import AuditEntry, Evaluation, Model, ModelVersion, Role

router = APIRouter(
    prefix="/audit",
    tags=["audit"],
    responses={**AUTH_ERRORS, **DATABASE_UNAVAILABLE},
    dependencies=[Depends(require_role(Role.auditor))],
)

MAX_PAGE = 1000


@router.get(
    "/log",
    response_model=AuditEntriesPublic,
    responses={422: {"model": ProblemPublic, "description": "A filter or the paging is malformed."}},
)
def list_audit_log(
    session: SessionDep,
    action: Annotated[str | None, Query(min_length=1, max_length=64, pattern=NO_NUL)] = None,
    object_type: Annotated[str | None, Query(min_length=1, max_length=32, pattern=NO_NUL)] = None,
    object_id: Annotated[str | None, Query(min_length=1, max_length=64, pattern=NO_NUL)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> AuditEntriesPublic:
    """List audit log entries in the chain's order, filtered by action and by object (type, id)."""
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
    return AuditEntriesPublic(data=[AuditEntryPublic.of(entry) for entry in entries], count=count)


@router.get("/log/verify", response_model=ChainReportPublic)
def verify_audit_log(session: SessionDep) -> ChainReportPublic:
    """Recompute the audit log's hash chain; report the first entry that does not fit, if any."""
    report = verify_chain(session)
    return ChainReportPublic(
        ok=report.ok, entries=report.entries, first_broken_id=report.first_broken_id, reason=report.reason
    )


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
