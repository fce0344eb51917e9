"""Data sets: registering their training samples and the subjects who own them (admin)."""

from typing import Annotated

from fastapi import APIRouter, Path, status
from sqlalchemy.exc import IntegrityError

from service.api.deps import AdminDep, SessionDep
from service.api.schemas import (
    AUTH_ERRORS,
    BODY_TOO_LARGE,
    DATABASE_UNAVAILABLE,
    NO_NUL,
    ErrorPublic,
    ProblemPublic,
    SamplesCreate,
    SamplesRegistered,
)
from service.requests import samples as sample_registry
from service.requests.problems import RequestConflict

router = APIRouter(prefix="/datasets", tags=["datasets"], responses={**AUTH_ERRORS, **DATABASE_UNAVAILABLE})


@router.post(
    "/{dataset}/samples",
    status_code=status.HTTP_201_CREATED,
    response_model=SamplesRegistered,
    responses={
        **BODY_TOO_LARGE,
        400: {"model": ErrorPublic, "description": "The body is not UTF-8 text."},
        409: {"model": ProblemPublic, "description": "Some dataset indexes are already registered (named)."},
        422: {"model": ProblemPublic, "description": "The body is malformed, empty, too long, or lists an index "
              "twice; `loc` names the field."},
    },
)
def register_samples(
    dataset: Annotated[str, Path(min_length=1, max_length=64, pattern=NO_NUL)],
    body: SamplesCreate,
    session: SessionDep,
    caller: AdminDep,
) -> SamplesRegistered:
    """Register training samples of a data set and their subjects (created as needed); all or nothing."""
    try:
        created, subjects_created = sample_registry.register_samples(
            session,
            dataset=dataset,
            samples=[(sample.dataset_index, sample.subject_id) for sample in body.samples],
            actor=caller.actor,
        )
        response = SamplesRegistered(
            dataset=dataset,
            sample_count=len(created),
            subjects_created=subjects_created,
            samples=created,
        )
        session.commit()
    except IntegrityError:
        # A concurrent registration took some of these indexes (or created a subject) between the
        # checks and the inserts.
        session.rollback()
        raise RequestConflict(
            "samples",
            "a concurrent registration conflicted with this one; retry to see which indexes are taken",
            error_type="concurrent_registration",
        ) from None
    return response
