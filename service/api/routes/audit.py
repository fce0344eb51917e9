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
    AuditPublic,
    ChainReportPublic,
    ErrorPublic,
    Page,
    ProblemPublic,
    ReferenceStatePublic,
    VersionAuditPublic,
)
from service.audit.comparison import compare_with_references
from service.audit.queries import audit_entries_page, matching_evaluation, newest_evaluation_of_model
from service.core.audit_log import verify_chain
from service.core.models import Model, ModelVersion, Role, VersionKind
from service.deployments.queries import deployed_version, find_model, find_version

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
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> Page[AuditEntryPublic]:
    """List audit log entries in the chain's order, filtered by action and by object (type, id)."""
    entries, count = audit_entries_page(
        session, action=action, object_type=object_type, object_id=object_id, limit=limit, offset=offset
    )
    return Page[AuditEntryPublic](data=entries, count=count)


@router.get("/log/verify", response_model=ChainReportPublic)
def verify_audit_log(session: SessionDep) -> ChainReportPublic:
    """Recompute the audit log's hash chain; report the first entry that does not fit, if any."""
    return ChainReportPublic.model_validate(verify_chain(session))


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
    return deployment_audit(session, _model(session, model or settings.default_model))


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
    version_id: Annotated[int, Path(ge=1, le=2**31 - 1)], session: SessionDep
) -> VersionAuditPublic:
    """Get one version's FA, RA, TA, MIA against the newest reference that excludes the same samples."""
    version = find_version(session, version_id)
    if version is None:
        raise HTTPException(status_code=404, detail=f"model version {version_id} not found")
    return version_audit(session, version)


def _model(session, name: str) -> Model:
    db_model = find_model(session, name)
    if db_model is None:
        raise HTTPException(status_code=404, detail=f"model {name!r} not found")
    return db_model


def reference_state_public(session, version: ModelVersion) -> ReferenceStatePublic:
    comparison = compare_with_references(session, version)
    reference = comparison.reference
    return ReferenceStatePublic(
        status=comparison.status,
        message=comparison.describe(version),
        reference_id=None if reference is None else reference.id,
        created_at=None if reference is None else reference.created_at,
        excluded_sample_count=None if reference is None else len(reference.excluded_sample_ids),
        excluded_sample_ids=None if reference is None else sorted(reference.excluded_sample_ids),
        missing_from_reference=comparison.missing_from_reference,
        extra_in_reference=comparison.extra_in_reference,
    )


def deployment_audit(session, db_model: Model) -> AuditPublic:
    """The deployed version's newest evaluation (else the newest of an earlier version), and where
    the deployed version stands against the references."""
    name, deployed_id = db_model.name, db_model.deployed_version_id
    deployed = deployed_version(session, db_model)
    reference = reference_state_public(session, deployed) if deployed is not None else None
    evaluation = matching_evaluation(session, deployed) if deployed is not None else None
    if evaluation is not None:
        return AuditPublic(model=name, deployed_version_id=deployed_id, status="current",
                           message=f"evaluation of the deployed version {deployed_id} against reference "
                           f"{evaluation.reference_id}, trained without the same "
                           f"{len(deployed.excluded_sample_ids)} samples",
                           evaluation=evaluation, reference=reference)
    why = "" if reference is None else f"; {reference.message}"
    earlier = newest_evaluation_of_model(session, name)
    if earlier is None:
        return AuditPublic(model=name, deployed_version_id=deployed_id, status="missing",
                           message=f"no version of model {name!r} has been evaluated against a retrain reference "
                           f"yet{why}", evaluation=None, reference=reference)
    return AuditPublic(
        model=name, deployed_version_id=deployed_id, status="stale",
        message=f"the deployed version {deployed_id} has not been evaluated yet; this is the evaluation of the "
        f"earlier version {earlier.version_id}{why}",
        evaluation=earlier, reference=reference,
    )


def version_audit(session, version: ModelVersion) -> VersionAuditPublic:
    deployed = find_model(session, version.model_name).deployed_version_id == version.id
    base = {
        "version_id": version.id, "model": version.model_name, "kind": version.kind, "deployed": deployed,
        "method": version.method, "config": version.config, "created_at": version.created_at,
        "excluded_sample_count": len(version.excluded_sample_ids),
    }
    if version.kind == VersionKind.reference:
        return VersionAuditPublic(**base, status="not_applicable", reference=None, evaluation=None,
                                  message=f"version {version.id} is a retrain reference: versions are audited "
                                  "against it")
    if not version.excluded_sample_ids:
        return VersionAuditPublic(**base, status="not_applicable", reference=None, evaluation=None,
                                  message=f"version {version.id} excludes no samples: nothing forgotten to audit")
    reference = reference_state_public(session, version)
    if reference.status == "missing":
        return VersionAuditPublic(**base, status="missing_reference", reference=reference, evaluation=None,
                                  message=f"version {version.id} cannot be audited: {reference.message}")
    if reference.status == "stale":
        return VersionAuditPublic(**base, status="stale_reference", reference=reference, evaluation=None,
                                  message=f"version {version.id} cannot be audited: {reference.message}")
    evaluation = matching_evaluation(session, version)
    if evaluation is None:
        return VersionAuditPublic(
            **base, status="not_evaluated", reference=reference, evaluation=None,
            message=f"{reference.message}, but version {version.id} has not been evaluated against it (a worker "
            "evaluates the deployed version when a reference is trained)",
        )
    return VersionAuditPublic(**base, status="current", reference=reference, evaluation=evaluation,
                              message=f"evaluation of version {version.id} against reference "
                              f"{evaluation.reference_id}, trained without the same "
                              f"{len(version.excluded_sample_ids)} samples")
