"""Data subjects: their samples, which are active or forgotten, and their forget requests."""

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path
from sqlalchemy import select

from service.api.deps import ReaderDep, SessionDep
from service.api.schemas import (
    AUTH_ERRORS,
    DATABASE_UNAVAILABLE,
    NO_NUL,
    ErrorPublic,
    ForgetRequestPublic,
    SamplePublic,
    SubjectPublic,
)
from service.core.models import ForgetRequest, Model, Sample, SampleStatus, Subject
from service.requests.queries import sample_ids_of_requests

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
    subject = session.get(Subject, subject_id)
    if subject is None:
        raise HTTPException(status_code=404, detail=f"subject {subject_id!r} not found")
    samples = select(Sample).where(Sample.subject_id == subject_id).order_by(Sample.id)
    requests = (
        select(ForgetRequest)
        .where(ForgetRequest.subject_id == subject_id)
        .order_by(ForgetRequest.received_at.desc(), ForgetRequest.id.desc())
    )
    if caller.model is not None:
        # A key limited to a model sees that model's data set and requests only.
        model = session.get(Model, caller.model)
        samples = samples.where(Sample.dataset == (model.dataset if model else None))
        requests = requests.where(ForgetRequest.model_name == caller.model)
    sample_rows = session.scalars(samples).all()
    request_rows = session.scalars(requests).all()
    sample_ids = sample_ids_of_requests(session, [request.id for request in request_rows])
    return SubjectPublic(
        id=subject.id,
        created_at=subject.created_at,
        active_sample_count=sum(sample.status == SampleStatus.active for sample in sample_rows),
        forgotten_sample_count=sum(sample.status == SampleStatus.forgotten for sample in sample_rows),
        samples=[SamplePublic.of(sample) for sample in sample_rows],
        requests=[ForgetRequestPublic.of(request, sample_ids[request.id]) for request in request_rows],
    )
