"""Which retrain reference a version is audited against, and how it differs.

A full reference always wins over an approximate one (trained on a coreset of the retain set,
QFORGET_APPROXIMATE_REFERENCE_FRACTION): an approximate reference only stands in, labelled, until
the full reference of its state is recorded (docs/audit.md, Approximate references)."""

from dataclasses import dataclass
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.models import ModelVersion, VersionKind

# How a version stands against the model's retrain references.
ReferenceMatch = Literal["matching", "stale", "missing"]

# The caveat every figure against an approximate reference carries (measured: docs/bench/coresets.md).
APPROXIMATE_CAVEAT = ("its figures can be off by several points of AG (approximate references lay 5 to 38 points "
                      "of AG from the full reference on the digits and on CIFAR-10)")


def reference_label(reference: ModelVersion) -> str:
    """How a sentence names a reference: "reference 7", or "approximate reference 7 (coreset of 130
    samples)" so that an approximate one is never mistaken for the full reference."""
    if not reference.approximate:
        return f"reference {reference.id}"
    samples = (reference.metrics or {}).get("coreset", {}).get("samples")
    coreset = "a coreset" if samples is None else f"a coreset of {samples} samples"
    return f"approximate reference {reference.id} (trained on {coreset} of the retain set)"


@dataclass(frozen=True)
class ReferenceComparison:
    status: ReferenceMatch
    reference: ModelVersion | None  # the reference excluding the same samples (full first), else the newest one
    missing_from_reference: list[int]  # samples the version excludes and the reference does not
    extra_in_reference: list[int]  # samples the reference excludes and the version does not

    @property
    def approximate(self) -> bool:
        return self.reference is not None and self.reference.approximate

    def describe(self, version: ModelVersion) -> str:
        version_id, version_excluded = version.id, len(version.excluded_sample_ids)
        if self.status == "missing":
            return "no retrain reference has been trained for this model yet"
        label = reference_label(self.reference)
        if self.status == "matching":
            interim = ("" if not self.approximate else
                       f": an interim audit until the full reference of this state is recorded; {APPROXIMATE_CAVEAT}")
            return f"{label} excludes the same {version_excluded} samples as version {version_id}{interim}"
        return (f"the newest {label} is stale: it excludes "
                f"{len(self.reference.excluded_sample_ids)} samples, version {version_id} excludes "
                f"{version_excluded}; {len(self.missing_from_reference)} samples the version forgot are still "
                f"in the reference's training data and {len(self.extra_in_reference)} samples the reference "
                f"excludes are not excluded by the version; a reference of this state is needed "
                f"(POST /models/{version.model_name}/references)")


def references_newest_first(session: Session, model_name: str) -> list[ModelVersion]:
    """The model's retrain references, approximate ones included, newest first."""
    return list(session.scalars(
        select(ModelVersion)
        .where(ModelVersion.model_name == model_name, ModelVersion.kind == VersionKind.reference)
        .order_by(ModelVersion.id.desc())
    ))


def references_in_preference(session: Session, model_name: str) -> list[ModelVersion]:
    """The model's references in the order the audit prefers them: full ones newest first, then
    approximate ones newest first."""
    return sorted(references_newest_first(session, model_name), key=lambda reference: reference.approximate)


def compare_with_references(session: Session, version: ModelVersion) -> ReferenceComparison:
    """The newest full reference that excludes exactly the version's samples, else the newest
    approximate one that does; else the newest reference (full first: stale) with what differs;
    else missing."""
    excluded = set(version.excluded_sample_ids)
    references = references_in_preference(session, version.model_name)
    if not references:
        return ReferenceComparison("missing", None, [], [])
    for reference in references:
        if set(reference.excluded_sample_ids) == excluded:
            return ReferenceComparison("matching", reference, [], [])
    newest = references[0]
    reference_excluded = set(newest.excluded_sample_ids)
    return ReferenceComparison("stale", newest, sorted(excluded - reference_excluded),
                               sorted(reference_excluded - excluded))
