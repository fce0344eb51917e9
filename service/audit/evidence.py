"""Per-request evidence: a forget request's samples before and after unlearning by one of its
models (its part for that model), against a reference.

The figures are computed by the workers (the API holds no model) and stored per version and
sample (service.core.models.SampleScore): when a batch runs, for its parent and its new version;
when an evaluation runs, for the evaluated version and its reference. This module only reads them.

Beside the population figures (accuracy, the membership attackers' calls) it compares the version
after with the reference sample by sample: the difference of their logit-scaled true-label
confidences, log(p / (1 - p)). That is the quantity per-example membership tests (LiRA, U-LiRA) fit
Gaussians to, and it needs one stored float per version and sample, where a divergence of the
softmax outputs would need every class's probability stored. The threshold a difference must pass
to count is what two references trained with different seeds differ by (below): the service trains
one reference, so it cannot measure that spread itself.
"""

from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.audit.comparison import (
    APPROXIMATE_CAVEAT,
    compare_with_references,
    reference_label,
    references_in_preference,
)
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

EvidenceStatus = Literal["pending", "figures_missing", "reference_missing", "reference_stale", "interim", "complete"]

# |difference of logit-scaled confidences| above which a sample counts as treated differently from
# the reference. Two references trained from scratch without the same samples, differing only in
# their training seed, differ on their unseen samples by more than this on 5% of them: measured on
# the default recipe (THRESHOLD_SOURCE); another recipe's references may spread more or less, which
# the benchmark's --ulira stage measures.
DIFFERENCE_THRESHOLD = 4.4
THRESHOLD_SOURCE = (
    "95th percentile (4.36, rounded up to 4.4) of |difference of logit-scaled confidences| between two retrain "
    "references that differ only in their training seed, on their unseen forget samples: default recipe (digits "
    "CNN, LSQ+ W4A4, 30 epochs), 10% random forgetting (144 samples), 4 references per data seed, seeds 0 and 1, "
    "1,728 sample pairs; python -m workers.benchmarks.bench --dataset digits --model digits-cnn --forget-ratio 0.1 "
    "--seeds 0 1 --ulira (docs/audit.md)"
)


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

    @property
    def reference_difference(self) -> float | None:
        return logit_difference(self)


@dataclass(frozen=True)
class ReferenceComparison:
    """The version after against the reference, sample by sample, on the logit-scaled true-label
    confidence: what its differences come to and whether they exceed what two references differ by."""

    version_id: int
    reference_id: int
    sample_count: int  # samples both have the logit-scaled confidence for
    mean_difference: float  # mean |after - reference|
    max_difference: float
    above_count: int  # samples whose |difference| exceeds the threshold
    above_share: float  # percent of sample_count
    threshold: float
    threshold_source: str
    verdict: str


@dataclass(frozen=True)
class InstantStage:
    """A semi-parametric model's instant stage on the request's samples: the version deployed before
    (the parent) and the one whose datastore no longer holds them, with when it was deployed."""

    version_id: int
    at: object  # datetime
    before: FiguresSummary | None
    after: FiguresSummary | None


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
    reference_comparison: ReferenceComparison | None = None  # None without a reference or logits on both
    # The version after's integer export (what an edge device runs) on the batch's forget set, beside
    # the fake-quantized model evaluated here: workers.batches.run.integer_export_check.
    integer_export: dict | None = None
    instant: InstantStage | None = None  # a semi-parametric model's first stage, once it ran
    approximate: bool = False  # the reference given is an approximate one (a coreset's): interim figures


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
    instant = _instant_stage(session, part, [sample_id for sample_id, _ in samples])
    if part.status != RequestStatus.completed:
        stage = "" if instant is None else " (its instant stage took them out of the datastore: `instant`)"
        return Evidence(request, part.model_name, "pending", f"the request's part for model {part.model_name} is "
                        f"{part.status.value}: no version has forgotten its samples yet, so there are no figures"
                        f"{stage}", len(samples), instant=instant)

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
    comparison = _compare_with_reference(rows) if reference is not None else None
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
        status = "reference_stale" if not matching else "interim" if reference.approximate else "complete"
        message = reference_note
    return Evidence(request, part.model_name, status, message, len(samples), samples=rows,
                    reference_comparison=comparison, integer_export=after.metrics.get("integer_export"),
                    instant=instant, approximate=reference is not None and reference.approximate, **summaries)


def _instant_stage(session: Session, part: ForgetRequestPart, sample_ids: list[int]) -> InstantStage | None:
    if part.instant_version_id is None:
        return None
    version = session.get(ModelVersion, part.instant_version_id)
    return InstantStage(version.id, part.instant_at,
                        before=_summary(list(_scores(session, version.parent_id, sample_ids).values())),
                        after=_summary(list(_scores(session, version.id, sample_ids).values())))


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


def logit_difference(sample: EvidenceSample) -> float | None:
    """after - reference on the logit-scaled true-label confidence (positive: the version is surer of
    the true label than a model that never saw the sample); None when either lacks it."""
    if sample.after is None or sample.reference is None:
        return None
    if sample.after.confidence_logit is None or sample.reference.confidence_logit is None:
        return None
    return sample.after.confidence_logit - sample.reference.confidence_logit


def _compare_with_reference(rows: list[EvidenceSample]) -> ReferenceComparison | None:
    pairs = [(row, logit_difference(row)) for row in rows]
    pairs = [(row, difference) for row, difference in pairs if difference is not None]
    if not pairs:
        return None
    sizes = [abs(difference) for _, difference in pairs]
    above = sum(size > DIFFERENCE_THRESHOLD for size in sizes)
    verdict = ("indistinguishable from the reference on these samples" if above == 0
               else f"differs from the reference on {above} of {len(sizes)} samples")
    return ReferenceComparison(
        version_id=pairs[0][0].after.version_id, reference_id=pairs[0][0].reference.version_id,
        sample_count=len(sizes), mean_difference=sum(sizes) / len(sizes), max_difference=max(sizes),
        above_count=above, above_share=100.0 * above / len(sizes), threshold=DIFFERENCE_THRESHOLD,
        threshold_source=THRESHOLD_SOURCE, verdict=verdict,
    )


def _reference_for(
    session: Session, after: ModelVersion, sample_ids: list[int]
) -> tuple[ModelVersion | None, bool, str]:
    """The reference to compare with, whether it matches, and a sentence saying so: the one excluding
    exactly what the version after excludes; else the newest reference that at least never saw these
    samples (stale)."""
    comparison = compare_with_references(session, after)
    if comparison.status == "matching":
        interim = f": an interim comparison until the full reference is recorded; {APPROXIMATE_CAVEAT}"
        return comparison.reference, True, (f"{reference_label(comparison.reference)} was trained without the same "
                                            f"{len(after.excluded_sample_ids)} samples as version {after.id}"
                                            f"{interim if comparison.approximate else ''}")
    wanted = set(sample_ids)
    for reference in references_in_preference(session, after.model_name):
        if wanted <= set(reference.excluded_sample_ids):
            caveat = f"; {APPROXIMATE_CAVEAT}" if reference.approximate else ""
            return reference, False, (
                f"{reference_label(reference)} never saw these samples, but it is stale for version {after.id}: it "
                f"excludes {len(reference.excluded_sample_ids)} samples, version {after.id} excludes "
                f"{len(after.excluded_sample_ids)}; no reference of version {after.id}'s state exists{caveat}"
            )
    return None, False, (f"no retrain reference trained without these samples exists yet (version {after.id} has "
                         f"{'a stale reference' if comparison.status == 'stale' else 'no reference'})")
