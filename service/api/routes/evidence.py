"""Per-request evidence: a forget request's samples before and after unlearning, against a reference.

The figures are computed by the workers (the API holds no model, issue 8) and stored per version
and sample (service.core.models.SampleScore): when a batch runs, for its parent and its new version;
when an evaluation runs, for the evaluated version and its reference. This route only reads them.
"""

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path
from sqlalchemy import select

from service.api.deps import ReaderDep, SessionDep
from service.api.schemas import (
    AUTH_ERRORS,
    DATABASE_UNAVAILABLE,
    NO_NUL,
    ErrorPublic,
    EvidencePublic,
    EvidenceSamplePublic,
    FiguresSummaryPublic,
    ProblemPublic,
    SampleFiguresPublic,
)
from service.audit.comparison import compare_with_references
from service.core.models import (
    Batch,
    ForgetRequest,
    ForgetRequestSample,
    ModelVersion,
    RequestStatus,
    Sample,
    SampleScore,
    VersionKind,
)

router = APIRouter(prefix="/forget-requests", tags=["forget-requests"],
                   responses={**AUTH_ERRORS, **DATABASE_UNAVAILABLE})


@router.get(
    "/{request_id}/evidence",
    response_model=EvidencePublic,
    responses={
        404: {"model": ErrorPublic, "description": "No forget request has this id (that this key may see)."},
        422: {"model": ProblemPublic, "description": "The request id is malformed."},
    },
)
def read_evidence(
    request_id: Annotated[str, Path(max_length=36, pattern=NO_NUL)], session: SessionDep, caller: ReaderDep
) -> EvidencePublic:
    """Get the request's samples before and after unlearning: accuracy, true-label confidence and
    membership calls of the parent version, the version that forgot them, and a retrain reference."""
    request = session.get(ForgetRequest, request_id)
    # Another model's request is "not found" to a key limited to a model, as in GET /forget-requests/{id}.
    if request is None or (caller.model is not None and request.model_name != caller.model):
        raise HTTPException(status_code=404, detail=f"forget request {request_id!r} not found")
    samples = session.execute(
        select(Sample.id, Sample.dataset_index)
        .join(ForgetRequestSample, ForgetRequestSample.sample_id == Sample.id)
        .where(ForgetRequestSample.request_id == request_id)
        .order_by(Sample.id)
    ).all()
    sample_ids = [sample_id for sample_id, _ in samples]
    base = {"request_id": request.id, "model": request.model_name, "request_status": request.status,
            "sample_count": len(samples)}
    empty = {"before": None, "after": None, "reference": None, "samples": []}
    if request.status in (RequestStatus.rejected, RequestStatus.failed):
        return EvidencePublic(**base, **empty, status="not_applicable",
                              message=f"the request is {request.status.value}: its samples were not forgotten")
    if request.status != RequestStatus.completed:
        return EvidencePublic(**base, **empty, status="pending",
                              message=f"the request is {request.status.value}: no version has forgotten its samples "
                              "yet, so there are no figures")

    after = session.get(ModelVersion, request.completed_version_id)
    before_id = session.get(Batch, request.batch_id).parent_version_id
    figures = {"before": _scores(session, before_id, sample_ids), "after": _scores(session, after.id, sample_ids)}
    reference, matching, reference_note = _reference_for(session, after, sample_ids)
    figures["reference"] = _scores(session, reference.id, sample_ids) if reference is not None else {}

    rows = [
        EvidenceSamplePublic(sample_id=sample_id, dataset_index=dataset_index,
                             **{role: figures[role].get(sample_id) for role in figures})
        for sample_id, dataset_index in samples
    ]
    summaries = {role: _summary(list(scores.values())) for role, scores in figures.items()}
    missing = [f"{role} (version {version_id})" for role, version_id in (("before", before_id), ("after", after.id))
               if len(figures[role]) < len(sample_ids)]
    if missing:
        status = "figures_missing"
        message = (f"the worker recorded no figures for {' and '.join(missing)} on some of the request's samples "
                   "(versions made before per-sample evidence was kept have none)")
    elif reference is None:
        status, message = "reference_missing", reference_note
    elif len(figures["reference"]) < len(sample_ids):
        status = "reference_missing"
        message = f"{reference_note}, but it has no figures on all of these samples yet"
    else:
        status = "complete" if matching else "reference_stale"
        message = reference_note
    return EvidencePublic(**base, status=status, message=message, samples=rows, **summaries)


def _scores(session, version_id: int, sample_ids: list[int]) -> dict[int, SampleFiguresPublic]:
    rows = session.scalars(
        select(SampleScore).where(SampleScore.version_id == version_id, SampleScore.sample_id.in_(sample_ids))
    ).all()
    return {
        row.sample_id: SampleFiguresPublic(version_id=row.version_id, correct=row.correct,
                                           confidence=row.confidence, member=row.member, computed_at=row.computed_at)
        for row in rows
    }


def _summary(scores: list[SampleFiguresPublic]) -> FiguresSummaryPublic | None:
    if not scores:
        return None
    count = len(scores)
    return FiguresSummaryPublic(
        version_id=scores[0].version_id,
        sample_count=count,
        accuracy=100.0 * sum(score.correct for score in scores) / count,
        mean_confidence=sum(score.confidence for score in scores) / count,
        member_share=100.0 * sum(score.member for score in scores) / count,
    )


def _reference_for(session, after: ModelVersion, sample_ids: list[int]) -> tuple[ModelVersion | None, bool, str]:
    """The reference to compare with, whether it matches, and a sentence saying so: the one excluding
    exactly what the version after excludes; else the newest reference that at least never saw these
    samples (stale)."""
    comparison = compare_with_references(session, after)
    if comparison.status == "matching":
        return comparison.reference, True, (f"reference {comparison.reference.id} was trained without the same "
                                      f"{len(after.excluded_sample_ids)} samples as version {after.id}")
    wanted = set(sample_ids)
    references = session.scalars(
        select(ModelVersion)
        .where(ModelVersion.model_name == after.model_name, ModelVersion.kind == VersionKind.reference)
        .order_by(ModelVersion.id.desc())
    ).all()
    for reference in references:
        if wanted <= set(reference.excluded_sample_ids):
            return reference, False, (
                f"reference {reference.id} never saw these samples, but it is stale for version {after.id}: it "
                f"excludes {len(reference.excluded_sample_ids)} samples, version {after.id} excludes "
                f"{len(after.excluded_sample_ids)}; no reference of version {after.id}'s state exists"
            )
    return None, False, (f"no retrain reference trained without these samples exists yet (version {after.id} has "
                  f"{'a stale reference' if comparison.status == 'stale' else 'no reference'})")
