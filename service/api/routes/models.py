"""Model versions with their lineage, which one is deployed, and the deployed artifact itself."""

import logging
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Path, Query, Response, status
from fastapi.responses import StreamingResponse
from sqlalchemy import inspect

from service.api.deps import AdminDep, AuditorDep, SessionDep, SettingsDep
from service.api.schemas import (
    AUTH_ERRORS,
    DATABASE_UNAVAILABLE,
    NO_NUL,
    DatastoreDeltaPublic,
    DigitsOnly,
    ErrorPublic,
    ModelVersionPublic,
    Page,
    ProblemPublic,
    ReferenceRequestPublic,
)
from service.core.models import ReferenceRequest, VersionKind
from service.core.tasks import GPU_QUEUE
from service.deployments import artifacts
from service.deployments.delta import NoDelta, datastore_delta
from service.deployments.queries import deployed_version, find_model, find_version_with_lineage, versions_page
from service.references.schedule import ask_for_reference

log = logging.getLogger(__name__)

router = APIRouter(prefix="/models", tags=["models"], responses={**AUTH_ERRORS, **DATABASE_UNAVAILABLE})

MAX_PAGE = 500
ModelName = Annotated[str | None, Query(min_length=1, max_length=64, pattern=NO_NUL)]


@router.get(
    "",
    response_model=Page[ModelVersionPublic],
    responses={422: {"model": ProblemPublic, "description": "A filter or the paging is malformed."}},
)
def list_model_versions(
    session: SessionDep,
    caller: AuditorDep,
    model: ModelName = None,
    kind: VersionKind | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE), DigitsOnly] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1), DigitsOnly] = 0,
) -> Page[ModelVersionPublic]:
    """List model versions, newest first, with their lineage and which one each model has deployed."""
    versions, count = versions_page(session, model_name=model, kind=kind, limit=limit, offset=offset)
    return Page[ModelVersionPublic](data=versions, count=count)


@router.get(
    "/deployed/artifact",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The deployed version's artifact file; its ETag is the file's sha256.",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        },
        304: {"description": "The If-None-Match ETag is the deployed version's: the client's copy is current."},
        404: {"model": ErrorPublic, "description": "No model has this name, or it has no deployed version."},
        422: {"model": ProblemPublic, "description": "The model name is malformed."},
        500: {
            "model": ErrorPublic,
            "description": "The artifact is missing or fails its sha256 check: it is never served (and is logged).",
        },
    },
)
def download_deployed_artifact(
    session: SessionDep,
    settings: SettingsDep,
    caller: AuditorDep,
    model: ModelName = None,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match", max_length=1024)] = None,
) -> Response:
    """Download the deployed version's artifact, verified against its sha256 (a strong ETag)."""
    name = model or settings.default_model
    db_model = find_model(session, name)
    if db_model is None:
        raise HTTPException(status_code=404, detail=f"model {name!r} not found")
    version = deployed_version(session, db_model)
    if version is None:
        raise HTTPException(status_code=404, detail=f"model {name!r} has no deployed version")
    version_id, sha256, path = version.id, version.sha256, version.artifact_path
    # End the transaction before the file goes out: on SQLite it holds the write lock, and a
    # download may take long.
    session.rollback()
    etag = f'"{sha256}"'
    headers = {"ETag": etag, "Cache-Control": "no-cache", "X-Model-Version": str(version_id)}
    if if_none_match is not None and _etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    try:
        file, size = artifacts.open_verified(path, sha256)
    except artifacts.ArtifactUnavailable as exc:
        log.error("integrity: model %s deployed version %s not served: %s", name, version_id, exc)
        raise HTTPException(
            status_code=500,
            detail=f"the artifact of model {name!r} version {version_id} is missing or fails its sha256 check; "
            "it is not served",
        ) from None
    headers |= {
        "Content-Length": str(size),
        "Content-Disposition": f'attachment; filename="{sha256}.pt"',
    }
    return StreamingResponse(artifacts.read_chunks(file), media_type="application/octet-stream", headers=headers)


@router.get(
    "/deployed/datastore-delta",
    response_model=DatastoreDeltaPublic,
    responses={
        404: {"model": ErrorPublic, "description": "No model has this name, or it has no deployed version."},
        409: {"model": ErrorPublic, "description": "No delta leads from that artifact to the deployed one (not a "
              "semi-parametric model, not an ancestor, or the encoder changed since): fetch the whole artifact."},
        422: {"model": ProblemPublic, "description": "The model name or the sha256 is malformed."},
    },
)
def read_datastore_delta(
    session: SessionDep,
    settings: SettingsDep,
    caller: AuditorDep,
    since: Annotated[str, Query(pattern="^[0-9a-f]{64}$", description="The sha256 (ETag) of the artifact the "
                                "device holds.")],
    model: ModelName = None,
) -> DatastoreDeltaPublic:
    """What an edge device holding an earlier artifact of a semi-parametric model drops from its datastore to
    match the deployed one (its ETag), instead of downloading it again."""
    name = model or settings.default_model
    db_model = find_model(session, name)
    if db_model is None or db_model.deployed_version_id is None:
        raise HTTPException(status_code=404, detail=f"model {name!r} not found or not deployed")
    try:
        delta = datastore_delta(session, db_model, since)
    except NoDelta as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    return DatastoreDeltaPublic.model_validate(delta)


def _etag_matches(if_none_match: str, etag: str) -> bool:
    # RFC 9110 13.1.2: If-None-Match uses the weak comparison, so W/"x" matches "x"; "*" matches any.
    candidates = [candidate.strip() for candidate in if_none_match.split(",")]
    return any(candidate == "*" or candidate.removeprefix("W/") == etag for candidate in candidates)


@router.get(
    "/{version_id}",
    response_model=ModelVersionPublic,
    responses={404: {"model": ErrorPublic, "description": "No model version has this id."}},
)
def read_model_version(
    version_id: Annotated[int, Path(ge=1, le=2**31 - 1), DigitsOnly], session: SessionDep, caller: AuditorDep
) -> ModelVersionPublic:
    """Get a model version: its kind, parent, batch, method, configuration, metrics, sha256, exclusions."""
    version = find_version_with_lineage(session, version_id)
    if version is None:
        raise HTTPException(status_code=404, detail=f"model version {version_id} not found")
    return ModelVersionPublic.model_validate(version)


@router.post(
    "/{model}/references",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ReferenceRequestPublic,
    responses={
        404: {"model": ErrorPublic, "description": "No model has this name."},
        409: {"model": ErrorPublic, "description": "The model has no deployed version to make a reference for."},
        422: {"model": ProblemPublic, "description": "The model name is malformed."},
    },
)
def request_retrain_reference(
    model: Annotated[str, Path(min_length=1, max_length=64, pattern=NO_NUL)], session: SessionDep, caller: AdminDep
) -> ReferenceRequestPublic:
    """Queue a retrain reference of the model's current state (trained from scratch without every
    forgotten sample) and an evaluation of the deployment against it; the scheduler sends it to a GPU worker."""
    db_model = find_model(session, model, for_update=True)
    if db_model is None:
        raise HTTPException(status_code=404, detail=f"model {model!r} not found")
    if db_model.deployed_version_id is None:
        raise HTTPException(status_code=409, detail=f"model {model!r} has no deployed version yet")
    request, created = ask_for_reference(session, db_model, caller.actor, "asked for by an admin")
    session.commit()
    return _reference_request_public(request, created)


def _reference_request_public(request: ReferenceRequest, created: bool) -> ReferenceRequestPublic:
    columns = {column.key: getattr(request, column.key) for column in inspect(request).mapper.column_attrs}
    return ReferenceRequestPublic.model_validate({**columns, "queue": GPU_QUEUE, "created": created})
