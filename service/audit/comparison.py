"""Which retrain reference a version is audited against, and how it differs."""

from dataclasses import dataclass
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.models import ModelVersion, VersionKind

# How a version stands against the model's retrain references.
ReferenceMatch = Literal["matching", "stale", "missing"]


@dataclass(frozen=True)
class ReferenceComparison:
    status: ReferenceMatch
    reference: ModelVersion | None  # the newest reference excluding the same samples, else the newest one
    missing_from_reference: list[int]  # samples the version excludes and the reference does not
    extra_in_reference: list[int]  # samples the reference excludes and the version does not

    def describe(self, version: ModelVersion) -> str:
        version_id, version_excluded = version.id, len(version.excluded_sample_ids)
        if self.status == "missing":
            return "no retrain reference has been trained for this model yet"
        if self.status == "matching":
            return (f"reference {self.reference.id} excludes the same {version_excluded} samples as version "
                    f"{version_id}")
        return (f"the newest reference {self.reference.id} is stale: it excludes "
                f"{len(self.reference.excluded_sample_ids)} samples, version {version_id} excludes "
                f"{version_excluded}; {len(self.missing_from_reference)} samples the version forgot are still "
                f"in the reference's training data and {len(self.extra_in_reference)} samples the reference "
                f"excludes are not excluded by the version; a reference of this state is needed "
                f"(POST /models/{version.model_name}/references)")


def references_newest_first(session: Session, model_name: str) -> list[ModelVersion]:
    """The model's retrain references, newest first."""
    return list(session.scalars(
        select(ModelVersion)
        .where(ModelVersion.model_name == model_name, ModelVersion.kind == VersionKind.reference)
        .order_by(ModelVersion.id.desc())
    ))


def compare_with_references(session: Session, version: ModelVersion) -> ReferenceComparison:
    """The newest reference that excludes exactly the version's samples; else the newest reference
    (stale) with what differs; else missing."""
    excluded = set(version.excluded_sample_ids)
    references = references_newest_first(session, version.model_name)
    if not references:
        return ReferenceComparison("missing", None, [], [])
    for reference in references:
        if set(reference.excluded_sample_ids) == excluded:
            return ReferenceComparison("matching", reference, [], [])
    newest = references[0]
    reference_excluded = set(newest.excluded_sample_ids)
    return ReferenceComparison("stale", newest, sorted(excluded - reference_excluded),
                               sorted(reference_excluded - excluded))
