"""Batches as operations sees them, and the admin decisions on deployment: approve or discard a
batch the quality gate held, roll back to a version that has forgotten everything."""

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
    Id,
    Page,
    ProblemPublic,
    UtcDatetime,
)
from service.core.models import BatchStatus
from service.core.settings import UnlearnSettings
from service.deployments import deploy as deployments
from service.deployments.queries import batches_page, find_batch, find_model

router = APIRouter(tags=["deployments"], responses={**AUTH_ERRORS, **DATABASE_UNAVAILABLE})

REFUSED = {409: {"model": ErrorPublic, "description": "The action would break an invariant; the detail says which."}}
NOT_FOUND = {404: {"model": ErrorPublic, "description": "No such batch or model."}}


class BatchPublic(BaseModel):
    # Read from a row of service.deployments.queries.batches_page.
    model_config = ConfigDict(from_attributes=True)

    id: int
    model: str = Field(validation_alias="model_name")
    status: BatchStatus
    parent_version_id: int = Field(description="The version the run started from (a retry starts there too).")
    result_version_id: int | None = Field(description="The version the run produced, deployed or held.")
    attempts: int
    error: str | None = Field(description="The last attempt's error, if one failed.")
    hold_reason: str | None = Field(description="Why the quality gate held the result for review.")
    lease_owner: str | None
    lease_expires_at: UtcDatetime | None
    created_at: UtcDatetime
    finished_at: UtcDatetime | None
    request_count: int


class BatchDiscard(BaseModel):
    model_config = ConfigDict(extra="forbid")
    unlearn_settings: UnlearnSettings | None = Field(
        default=None, description="Settings for the model's next runs; omitted: keep the current ones.")


class Rollback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version_id: Id


class DeploymentPublic(BaseModel):
    # Read from the model.
    model_config = ConfigDict(from_attributes=True)

    model: str = Field(validation_alias="name")
    deployed_version_id: int | None


def _batch_public(session, batch_id: int) -> BatchPublic:
    batch = find_batch(session, batch_id)
    if batch is None:
        raise HTTPException(status_code=404, detail=f"batch {batch_id} not found")
    return BatchPublic.model_validate(batch)


BatchId = Annotated[int, Path(ge=1, le=2**31 - 1), DigitsOnly]


@router.get("/batches", response_model=Page[BatchPublic], responses={422: {"model": ProblemPublic}})
def list_batches(
    session: SessionDep,
    caller: AuditorDep,
    model: Annotated[str | None, Query(min_length=1, max_length=64, pattern=NO_NUL)] = None,
    status: BatchStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=500), DigitsOnly] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1), DigitsOnly] = 0,
) -> Page[BatchPublic]:
    """List unlearning batches, newest first: status, attempts, errors, holds and leases."""
    batches, count = batches_page(session, model_name=model, status=status, limit=limit, offset=offset)
    return Page[BatchPublic](data=batches, count=count)


@router.get("/batches/{batch_id}", response_model=BatchPublic, responses=NOT_FOUND)
def get_batch(session: SessionDep, caller: AuditorDep, batch_id: BatchId) -> BatchPublic:
    """One batch: its status, lineage, attempts, and why it is held or failed."""
    return _batch_public(session, batch_id)


def _refused(error: deployments.AdminRefusal) -> HTTPException:
    return HTTPException(status_code=404 if isinstance(error, deployments.UnknownObject) else 409, detail=str(error))


@router.post("/batches/{batch_id}/approve", response_model=BatchPublic, responses={**NOT_FOUND, **REFUSED})
def approve_batch(session: SessionDep, caller: AdminDep, actor: ActorDep,
                  batch_id: BatchId) -> BatchPublic:
    """Deploy a held batch's version despite the quality gate, completing its requests."""
    try:
        deployments.approve_batch(session, batch_id, actor)
        session.commit()
    except deployments.AdminRefusal as error:
        raise _refused(error) from None
    return _batch_public(session, batch_id)


@router.post("/batches/{batch_id}/discard", response_model=BatchPublic,
             responses={**NOT_FOUND, **REFUSED, 422: {"model": ProblemPublic}})
def discard_batch(session: SessionDep, caller: AdminDep, actor: ActorDep,
                  batch_id: BatchId, body: BatchDiscard | None = None) -> BatchPublic:
    """Refuse a held batch: its requests go back to pending, optionally with new Q-MUL settings."""
    settings = body.unlearn_settings.model_dump(exclude_none=True) if body and body.unlearn_settings else None
    try:
        deployments.discard_batch(session, batch_id, actor, settings or None)
        session.commit()
    except deployments.AdminRefusal as error:
        raise _refused(error) from None
    return _batch_public(session, batch_id)


@router.post("/models/{model}/rollback", response_model=DeploymentPublic,
             responses={**NOT_FOUND, **REFUSED, 422: {"model": ProblemPublic}})
def rollback(session: SessionDep, caller: AdminDep, actor: ActorDep,
             model: Annotated[str, Path(min_length=1, max_length=64, pattern=NO_NUL)],
             body: Rollback) -> DeploymentPublic:
    """Deploy an earlier version; refused unless it has forgotten every forgotten sample."""
    try:
        deployments.rollback(session, model, body.version_id, actor)
        session.commit()
    except deployments.AdminRefusal as error:
        raise _refused(error) from None
    return DeploymentPublic.model_validate(find_model(session, model))
