"""The audit: evaluations of versions against retrain references, the printable report, and the audit log."""

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query
from fastapi.responses import HTMLResponse

from service.api.deps import SessionDep, SettingsDep, require_role
from service.api.schemas import (
    AUTH_ERRORS,
    DATABASE_UNAVAILABLE,
    NO_NUL,
    AuditEntryPublic,
    AuditLogVerificationPublic,
    AuditPublic,
    DigitsOnly,
    ErrorPublic,
    Page,
    ProblemPublic,
    SubjectAuditPublic,
    VersionAuditPublic,
)
from service.audit.queries import audit_entries_page, subject_audit
from service.audit.standing import deployment_audit, version_audit
from service.core.audit_log import verify_chain
from service.core.models import Model, Role
from service.deployments.queries import find_model, find_version

router = APIRouter(
    prefix="/audit",
    tags=["audit"],
    responses={**AUTH_ERRORS, **DATABASE_UNAVAILABLE},
    dependencies=[Depends(require_role(Role.auditor))],
)

MAX_PAGE = 1000


@router.get(
    "/log",
    response_model=Page[AuditEntryPublic],
    responses={422: {"model": ProblemPublic, "description": "A filter or the paging is malformed."}},
)
def list_audit_log(
    session: SessionDep,
    action: Annotated[str | None, Query(min_length=1, max_length=64, pattern=NO_NUL)] = None,
    object_type: Annotated[str | None, Query(min_length=1, max_length=32, pattern=NO_NUL)] = None,
    object_id: Annotated[str | None, Query(min_length=1, max_length=64, pattern=NO_NUL)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE), DigitsOnly] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1), DigitsOnly] = 0,
) -> Page[AuditEntryPublic]:
    """List audit log entries in the chain's order, filtered by action and by object (type, id)."""
    entries, count = audit_entries_page(
        session, action=action, object_type=object_type, object_id=object_id, limit=limit, offset=offset
    )
    return Page[AuditEntryPublic](data=entries, count=count)


@router.get("/log/verify", response_model=AuditLogVerificationPublic)
def verify_audit_log(session: SessionDep) -> AuditLogVerificationPublic:
    """Recompute the audit log's keyed hash chain and check it against every signed checkpoint of its
    head; report the first entry that does not fit, or that a checkpoint names but the log lost."""
    return AuditLogVerificationPublic.model_validate(verify_chain(session))


@router.get(
    "/subjects/{subject_id}",
    response_model=SubjectAuditPublic,
    responses={422: {"model": ProblemPublic, "description": "The subject id is malformed."}},
)
def read_subject_audit(
    subject_id: Annotated[str, Path(min_length=1, max_length=128, pattern=NO_NUL)], session: SessionDep
) -> SubjectAuditPublic:
    """Get what the audit log holds about a subject, found by the pseudonym it records instead of the
    id: the subject's forget requests, received, completed, by which versions, when, and their entries."""
    return SubjectAuditPublic.model_validate(subject_audit(session, subject_id))


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
    return AuditPublic.model_validate(deployment_audit(session, _model(session, model or settings.default_model)))


@router.get(
    "/report",
    # The default (JSON) response class keeps the errors documented as JSON; the page is text/html.
    responses={
        200: {"description": "A printable HTML report with inline SVG plots.",
              "content": {"text/html": {"schema": {"type": "string"}}}},
        404: {"model": ErrorPublic, "description": "No model has this name."},
        422: {"model": ProblemPublic, "description": "The model name is malformed."},
    },
)
def read_audit_report(
    session: SessionDep,
    settings: SettingsDep,
    model: Annotated[str | None, Query(min_length=1, max_length=64, pattern=NO_NUL)] = None,
) -> HTMLResponse:
    """Get the audit as a printable HTML page: gaps over time, membership scores, requests against the deadline."""
    from service.audit import report as reports  # matplotlib: loaded by the first report, not by every API process

    db_model = _model(session, model or settings.default_model)
    page = reports.build_report(session, db_model, deployment_audit(session, db_model), settings.deadline_days)
    return HTMLResponse(page)


@router.get(
    "/versions/{version_id}",
    response_model=VersionAuditPublic,
    responses={
        404: {"model": ErrorPublic, "description": "No model version has this id."},
        422: {"model": ProblemPublic, "description": "The version id is not a positive integer."},
    },
)
def read_version_audit(
    version_id: Annotated[int, Path(ge=1, le=2**31 - 1), DigitsOnly], session: SessionDep
) -> VersionAuditPublic:
    """Get one version's FA, RA, TA, MIA against the newest reference that excludes the same samples."""
    version = find_version(session, version_id)
    if version is None:
        raise HTTPException(status_code=404, detail=f"model version {version_id} not found")
    return VersionAuditPublic.model_validate(version_audit(session, version))


def _model(session, name: str) -> Model:
    db_model = find_model(session, name)
    if db_model is None:
        raise HTTPException(status_code=404, detail=f"model {name!r} not found")
    return db_model
