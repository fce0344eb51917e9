"""Batches as operations sees them, and the admin decisions on deployment: approve or discard a
batch the quality gate held, roll back to a version that has forgotten everything."""

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select

from service.api.deps import ActorDep, AdminDep, AuditorDep, SessionDep
from service.api.schemas import AUTH_ERRORS, DATABASE_UNAVAILABLE, NO_NUL, ErrorPublic, ProblemPublic, UtcDatetime
from service.core.models import Batch, BatchStatus, ForgetRequest, Model
from service.deployments import deploy as deployments

router = APIRouter(tags=["deployments"], responses={**AUTH_ERRORS, **DATABASE_UNAVAILABLE})

REFUSED = {409: {"model": ErrorPublic, "description": "The action would break an invariant; the detail says which."}}
NOT_FOUND = {404: {"model": ErrorPublic, "description": "No such batch or model."}}


class BatchPublic(BaseModel):
    id: int
    model: str
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

    @classmethod
    def of(cls, batch: Batch, request_count: int) -> "BatchPublic":
        return cls(id=batch.id, model=batch.model_name, status=batch.status,
                   parent_version_id=batch.parent_version_id, result_version_id=batch.result_version_id,
                   attempts=batch.attempts, error=batch.error, hold_reason=batch.hold_reason,
                   lease_owner=batch.lease_owner, lease_expires_at=batch.lease_expires_at,
                   created_at=batch.created_at, finished_at=batch.finished_at, request_count=request_count)


class BatchesPublic(BaseModel):
    data: list[BatchPublic]
    count: int


class UnlearnSettings(BaseModel):
    """Q-MUL settings for a model's next runs (workers.engine.QMulConfig fields)."""

    model_config = ConfigDict(extra="forbid")
    epochs: int | None = Field(default=None, ge=1, le=1000)
    lr: float | None = Field(default=None, gt=0, le=1)
    momentum: float | None = Field(default=None, ge=0, lt=1)
    weight_decay: float | None = Field(default=None, ge=0, le=1)
    batch_size: int | None = Field(default=None, ge=1, le=4096)
    similar_labels: bool | None = None
    gradient_reweighting: bool | None = None
    grad_norm_batches: int | None = Field(default=None, ge=1, le=100_000)


class BatchDiscard(BaseModel):
    model_config = ConfigDict(extra="forbid")
    unlearn_settings: UnlearnSettings | None = Field(
        default=None, description="Settings for the model's next runs; omitted: keep the current ones.")


class Rollback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version_id: int = Field(ge=1, le=2**31 - 1)


class DeploymentPublic(BaseModel):
    model: str
    deployed_version_id: int | None


def _request_counts(session, batch_ids: list[int]) -> dict[int, int]:
    return dict(session.execute(
        select(ForgetRequest.batch_id, func.count()).where(ForgetRequest.batch_id.in_(batch_ids))
        .group_by(ForgetRequest.batch_id)).all())


def _batch_public(session, batch_id: int) -> BatchPublic:
    batch = session.get(Batch, batch_id)
    if batch is None:
        raise HTTPException(status_code=404, detail=f"batch {batch_id} not found")
    return BatchPublic.of(batch, _request_counts(session, [batch_id]).get(batch_id, 0))


BatchId = Annotated[int, Path(ge=1, le=2**31 - 1)]


@router.get("/batches", response_model=BatchesPublic, responses={422: {"model": ProblemPublic}})
def list_batches(
    session: SessionDep,
    caller: AuditorDep,
    model: Annotated[str | None, Query(min_length=1, max_length=64, pattern=NO_NUL)] = None,
    status: BatchStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> BatchesPublic:
    """List unlearning batches, newest first: status, attempts, errors, holds and leases."""
    conditions = []
    if model is not None:
        conditions.append(Batch.model_name == model)
    if status is not None:
        conditions.append(Batch.status == status)
    count = session.scalar(select(func.count()).select_from(Batch).where(*conditions))
    batches = session.scalars(select(Batch).where(*conditions).order_by(Batch.id.desc())
                              .limit(limit).offset(offset)).all()
    counts = _request_counts(session, [b.id for b in batches])
    return BatchesPublic(data=[BatchPublic.of(b, counts.get(b.id, 0)) for b in batches], count=count)


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
    return DeploymentPublic(model=model, deployed_version_id=session.get(Model, model).deployed_version_id)
