"""Forget requests: a data subject's Art. 17 erasure request against one model."""

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, status

from service import forget_requests
from service.api.deps import SessionDep, SettingsDep
from service.api.schemas import (
    DATABASE_UNAVAILABLE,
    NO_NUL,
    ErrorPublic,
    ForgetRequestCreate,
    ForgetRequestPublic,
    ProblemPublic,
)
from service.models import ForgetRequest

router = APIRouter(prefix="/forget-requests", tags=["forget-requests"], responses=DATABASE_UNAVAILABLE)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ForgetRequestPublic,
    responses={
        400: {"model": ErrorPublic, "description": "The body is not UTF-8 text."},
        409: {"model": ProblemPublic, "description": "Some of the samples are already in an open request."},
        422: {
            "model": ProblemPublic,
            "description": "The body is malformed, or names a model, subject or samples that cannot be "
            "forgotten; `loc` names the field.",
        },
    },
)
def create_forget_request(body: ForgetRequestCreate, session: SessionDep, settings: SettingsDep) -> ForgetRequestPublic:
    """Accept a request to forget a subject's samples; a worker unlearns them in a later batch."""
    request = forget_requests.create_forget_request(
        session,
        subject_id=body.subject_id,
        sample_ids=body.sample_ids,
        model_name=body.model or settings.default_model,
        deadline_days=settings.deadline_days,
        # Callers are anonymous until API keys arrive; then the key's name goes here.
        actor="api",
    )
    sample_ids = forget_requests.request_sample_ids(session, request.id)
    session.commit()
    return ForgetRequestPublic.of(request, sample_ids)


@router.get(
    "/{request_id}",
    response_model=ForgetRequestPublic,
    responses={404: {"model": ErrorPublic, "description": "No forget request has this id."}},
)
def read_forget_request(
    request_id: Annotated[str, Path(max_length=36, pattern=NO_NUL)], session: SessionDep
) -> ForgetRequestPublic:
    """Get a forget request: its status, deadline and, once completed, the model version that forgot it."""
    request = session.get(ForgetRequest, request_id)
    if request is None:
        raise HTTPException(status_code=404, detail=f"forget request {request_id!r} not found")
    return ForgetRequestPublic.of(request, forget_requests.request_sample_ids(session, request_id))
