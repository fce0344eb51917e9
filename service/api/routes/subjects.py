"""Data subjects: their samples, which are active or forgotten, and their forget requests."""

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path

from service.api.deps import ReaderDep, SessionDep
from service.api.schemas import AUTH_ERRORS, DATABASE_UNAVAILABLE, NO_NUL, ErrorPublic, SubjectPublic
from service.requests.queries import find_subject

router = APIRouter(prefix="/subjects", tags=["subjects"], responses={**AUTH_ERRORS, **DATABASE_UNAVAILABLE})


@router.get(
    "/{subject_id}",
    response_model=SubjectPublic,
    responses={404: {"model": ErrorPublic, "description": "No subject has this id."}},
)
def read_subject(
    subject_id: Annotated[str, Path(min_length=1, max_length=128, pattern=NO_NUL)],
    session: SessionDep,
    caller: ReaderDep,
) -> SubjectPublic:
    """Get a subject's samples with their status (active or forgotten) and the subject's forget requests."""
    # A key limited to a model sees that model's data set, requests and version ids only.
    subject = find_subject(session, subject_id, model_name=caller.model)
    if subject is None:
        raise HTTPException(status_code=404, detail=f"subject {subject_id!r} not found")
    return SubjectPublic.model_validate(subject)
