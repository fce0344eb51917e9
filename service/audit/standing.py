"""How a model's deployment, or one version, stands in the audit: evaluated against a retrain
reference that excludes the same samples (current; interim while that reference is only an
approximate one), only an older version evaluated (stale), or nothing to compare with yet; and why,
in a sentence an auditor can act on."""

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.audit.comparison import (
    APPROXIMATE_CAVEAT,
    ReferenceComparison,
    ReferenceMatch,
    compare_with_references,
    reference_label,
)
from service.audit.queries import matching_evaluation, newest_evaluation_of_model
from service.core.models import Evaluation, Model, ModelVersion, Sample, VersionKind
from service.deployments.queries import deployed_version, find_model

# The status "interim" opens its message with this: never "current" (docs/audit.md, Approximate references).
INTERIM = "interim audit against an approximate reference until the full reference of this state is recorded"


@dataclass(frozen=True)
class ReferenceStanding:
    """A version against the model's retrain references (service.audit.comparison), described."""

    status: ReferenceMatch
    message: str
    reference: ModelVersion | None
    missing_from_reference: list[int]
    extra_in_reference: list[int]

    @property
    def approximate(self) -> bool:
        """The reference is an approximate one (a coreset's): it stands in until the full one exists."""
        return self.reference is not None and self.reference.approximate

    @property
    def reference_id(self) -> int | None:
        return None if self.reference is None else self.reference.id

    @property
    def created_at(self) -> datetime | None:
        return None if self.reference is None else self.reference.created_at

    @property
    def excluded_sample_ids(self) -> list[int] | None:
        return None if self.reference is None else sorted(self.reference.excluded_sample_ids)

    @property
    def excluded_sample_count(self) -> int | None:
        return None if self.reference is None else len(self.reference.excluded_sample_ids)


@dataclass(frozen=True)
class DeploymentAudit:
    model: str
    deployed_version_id: int | None
    status: str  # current, interim (against an approximate reference), stale or missing
    message: str
    evaluation: Evaluation | None
    reference: ReferenceStanding | None  # None when nothing is deployed

    @property
    def approximate(self) -> bool:
        """The evaluation given is against an approximate reference."""
        return self.evaluation is not None and self.evaluation.approximate


@dataclass(frozen=True)
class VersionAudit:
    version_id: int
    model: str
    kind: VersionKind
    deployed: bool
    method: str
    config: dict[str, Any]
    created_at: datetime
    excluded_sample_count: int
    status: str  # current, interim, not_evaluated, stale_reference, missing_reference or not_applicable
    message: str
    reference: ReferenceStanding | None
    evaluation: Evaluation | None


def reference_standing(comparison: ReferenceComparison, version: ModelVersion) -> ReferenceStanding:
    return ReferenceStanding(comparison.status, comparison.describe(version), comparison.reference,
                             comparison.missing_from_reference, comparison.extra_in_reference)


def deployment_audit(session: Session, model: Model) -> DeploymentAudit:
    """The deployed version's newest evaluation (else the newest of an earlier version), and where
    the deployed version stands against the references."""
    name, deployed_id = model.name, model.deployed_version_id
    deployed = deployed_version(session, model)
    # Compared once: the standing and the evaluation chosen must speak of the same reference.
    comparison = compare_with_references(session, deployed) if deployed is not None else None
    reference = reference_standing(comparison, deployed) if comparison is not None else None
    evaluation = matching_evaluation(session, deployed, comparison) if comparison is not None else None
    if evaluation is not None:
        against = (f"evaluation of the deployed version {deployed_id} against {reference_label(evaluation.reference)}, "
                   f"trained without the same {len(deployed.excluded_sample_ids)} samples"
                   f"{erased_note(session, deployed)}")
        if evaluation.approximate:
            return DeploymentAudit(name, deployed_id, "interim", f"{INTERIM}: {against}; {APPROXIMATE_CAVEAT}",
                                   evaluation, reference)
        return DeploymentAudit(name, deployed_id, "current", against, evaluation, reference)
    why = "" if reference is None else f"; {reference.message}"
    earlier = newest_evaluation_of_model(session, name)
    if earlier is None:
        return DeploymentAudit(name, deployed_id, "missing",
                               f"no version of model {name!r} has been evaluated against a retrain reference "
                               f"yet{why}", None, reference)
    if earlier.version_id == deployed_id and earlier.approximate:  # the full reference recorded since
        return DeploymentAudit(name, deployed_id, "stale",
                               f"the deployed version {deployed_id} has not been evaluated against the full "
                               f"reference yet; this is its interim evaluation against "
                               f"{reference_label(earlier.reference)}: {APPROXIMATE_CAVEAT}{why}",
                               earlier, reference)
    return DeploymentAudit(name, deployed_id, "stale",
                           f"the deployed version {deployed_id} has not been evaluated yet; this is the evaluation "
                           f"of the earlier version {earlier.version_id}"
                           f"{' against ' + reference_label(earlier.reference) if earlier.approximate else ''}{why}",
                           earlier, reference)


def version_audit(session: Session, version: ModelVersion) -> VersionAudit:
    """One version against the newest reference that excludes the same samples."""
    def audit(status: str, message: str, reference: ReferenceStanding | None = None,
              evaluation: Evaluation | None = None) -> VersionAudit:
        return VersionAudit(
            version_id=version.id, model=version.model_name, kind=version.kind,
            deployed=find_model(session, version.model_name).deployed_version_id == version.id,
            method=version.method, config=version.config, created_at=version.created_at,
            excluded_sample_count=len(version.excluded_sample_ids), status=status, message=message,
            reference=reference, evaluation=evaluation)

    if version.kind == VersionKind.reference:
        kind = "an approximate" if version.approximate else "a"
        return audit("not_applicable", f"version {version.id} is {kind} retrain reference: versions are audited against it")
    if not version.excluded_sample_ids:
        return audit("not_applicable", f"version {version.id} excludes no samples: nothing forgotten to audit")
    comparison = compare_with_references(session, version)
    reference = reference_standing(comparison, version)
    if reference.status in ("missing", "stale"):
        return audit(f"{reference.status}_reference", f"version {version.id} cannot be audited: {reference.message}",
                     reference)
    evaluation = matching_evaluation(session, version, comparison)
    if evaluation is None:
        return audit("not_evaluated", f"{reference.message}, but version {version.id} has not been evaluated against "
                     "it (a worker evaluates the deployed version when a reference is trained)", reference)
    against = (f"evaluation of version {version.id} against {reference_label(evaluation.reference)}, trained without "
               f"the same {len(version.excluded_sample_ids)} samples{erased_note(session, version)}")
    if evaluation.approximate:
        return audit("interim", f"{INTERIM}: {against}; {APPROXIMATE_CAVEAT}", reference, evaluation)
    return audit("current", against, reference, evaluation)


def erased_note(session: Session, version: ModelVersion) -> str:
    """What an evaluation of the version cannot cover: its forgotten samples that were erased since."""
    erased = session.scalar(select(func.count()).select_from(Sample).where(
        Sample.id.in_(version.excluded_sample_ids), Sample.erased_at.is_not(None))) if version.excluded_sample_ids else 0
    if not erased:
        return ""
    return (f"; {erased} of these samples are erased: the forget-set figures (FA, MIA) of evaluations since cover "
            f"the other {len(version.excluded_sample_ids) - erased}, and the erased ones' figures are the evidence "
            "frozen by their forget requests")
