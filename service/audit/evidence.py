"""Per-request evidence: a forget request's samples before and after unlearning by one of its
models (its part for that model), against a reference.

The figures are computed by the workers (the API holds no model) and stored per version and
sample (service.core.models.SampleScore): when a batch runs, for its parent and its new version;
when an evaluation runs, for the evaluated version and its reference. This module only reads them.
"""

from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.audit.comparison import compare_with_references, references_newest_first
from service.core.models import (
    Batch,
    ForgetRequest,
    ForgetRequestPart,
    ForgetRequestSample,
    Model,
    ModelVersion,
    RequestStatus,
    Sample,
    SampleScore,
)

EvidenceStatus = Literal["pending", "figures_missing", "reference_missing", "reference_stale", "complete"]


@dataclass(frozen=True)
class FiguresSummary:
    """One version on the request's samples that have figures."""

    version_id: int
    sample_count: int
    accuracy: float  # percent predicted right
    mean_confidence: float  # of the true label
    member_share: float  # percent the membership attacker calls training members


@dataclass(frozen=True)
class EvidenceSample:
    sample_id: int
    dataset_index: int
    before: SampleScore | None
    after: SampleScore | None
    reference: SampleScore | None


@dataclass(frozen=True)
class Evidence:
    request: ForgetRequest
    model: str  # the part's model
    status: EvidenceStatus
    message: str
    sample_count: int
    before: FiguresSummary | None = None
    after: FiguresSummary | None = None
    reference: FiguresSummary | None = None
    samples: list[EvidenceSample] = field(default_factory=list)  # empty until the request is completed


def request_evidence(session: Session, request: ForgetRequest, part: ForgetRequestPart) -> Evidence:
    """The request's samples in the part's model before (the batch's parent version) and after (the
    version that completed the part), against the reference that excludes what the version after
    excludes, else the newest that at least never saw these samples."""
    dataset = session.scalar(select(Model.dataset).where(Model.name == part.model_name))
    samples = session.execute(
        select(Sample.id, Sample.dataset_index)
        .join(ForgetRequestSample, ForgetRequestSample.sample_id == Sample.id)
        .where(ForgetRequestSample.request_id == request.id, Sample.dataset == dataset)
        .order_by(Sample.id)
    ).all()
    if part.status != RequestStatus.completed:
        return Evidence(request, part.model_name, "pending", f"the request's part for model {part.model_name} is "
                        f"{part.status.value}: no version has forgotten its samples yet, so there are no figures",
                        len(samples))

    after = session.get(ModelVersion, part.completed_version_id)
    before_id = session.get(Batch, part.batch_id).parent_version_id
    # The samples this part's version forgot (one another request's part forgot first is not among them).
    forgotten_here = set(after.excluded_sample_ids) - set(session.get(ModelVersion, before_id).excluded_sample_ids)
    samples = [row for row in samples if row.id in forgotten_here]
    sample_ids = [sample_id for sample_id, _ in samples]
    scores = {"before": _scores(session, before_id, sample_ids), "after": _scores(session, after.id, sample_ids)}
    reference, matching, reference_note = _reference_for(session, after, sample_ids)
    scores["reference"] = _scores(session, reference.id, sample_ids) if reference is not None else {}

    rows = [
        EvidenceSample(sample_id, dataset_index, **{role: scores[role].get(sample_id) for role in scores})
        for sample_id, dataset_index in samples
    ]
    summaries = {role: _summary(list(by_sample.values())) for role, by_sample in scores.items()}
    missing = [f"{role} (version {version_id})" for role, version_id in (("before", before_id), ("after", after.id))
               if len(scores[role]) < len(sample_ids)]
    if missing:
        status = "figures_missing"
        message = (f"the worker recorded no figures for {' and '.join(missing)} on some of the request's samples "
                   "(versions made before per-sample evidence was kept have none)")
    elif reference is None:
        status, message = "reference_missing", reference_note
    elif len(scores["reference"]) < len(sample_ids):
        status = "reference_missing"
        message = f"{reference_note}, but it has no figures on all of these samples yet"
    else:
        status = "complete" if matching else "reference_stale"
        message = reference_note
    return Evidence(request, part.model_name, status, message, len(samples), samples=rows, **summaries)


def _scores(session: Session, version_id: int, sample_ids: list[int]) -> dict[int, SampleScore]:
    rows = session.scalars(
        select(SampleScore).where(SampleScore.version_id == version_id, SampleScore.sample_id.in_(sample_ids))
    ).all()
    return {row.sample_id: row for row in rows}


def _summary(scores: list[SampleScore]) -> FiguresSummary | None:
    if not scores:
        return None
    count = len(scores)
    return FiguresSummary(
        version_id=scores[0].version_id,
        sample_count=count,
        accuracy=100.0 * sum(score.correct for score in scores) / count,
        mean_confidence=sum(score.confidence for score in scores) / count,
        member_share=100.0 * sum(score.member for score in scores) / count,
    )


def _reference_for(
    session: Session, after: ModelVersion, sample_ids: list[int]
) -> tuple[ModelVersion | None, bool, str]:
    """The reference to compare with, whether it matches, and a sentence saying so: the one excluding
    exactly what the version after excludes; else the newest reference that at least never saw these
    samples (stale)."""
    comparison = compare_with_references(session, after)
    if comparison.status == "matching":
        return comparison.reference, True, (f"reference {comparison.reference.id} was trained without the same "
                                            f"{len(after.excluded_sample_ids)} samples as version {after.id}")
    wanted = set(sample_ids)
    for reference in references_newest_first(session, after.model_name):
        if wanted <= set(reference.excluded_sample_ids):
            return reference, False, (
                f"reference {reference.id} never saw these samples, but it is stale for version {after.id}: it "
                f"excludes {len(reference.excluded_sample_ids)} samples, version {after.id} excludes "
                f"{len(after.excluded_sample_ids)}; no reference of version {after.id}'s state exists"
            )
    return None, False, (f"no retrain reference trained without these samples exists yet (version {after.id} has "
                         f"{'a stale reference' if comparison.status == 'stale' else 'no reference'})")
