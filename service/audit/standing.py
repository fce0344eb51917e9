"""How a model's deployment, or one version, stands in the audit: evaluated against a retrain
reference that excludes the same samples (current), only an older version evaluated (stale), or
nothing to compare with yet; and why, in a sentence an auditor can act on."""

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.audit.comparison import ReferenceMatch, compare_with_references
from service.audit.queries import matching_evaluation, newest_evaluation_of_model
from service.core.models import Evaluation, Model, ModelVersion, Sample, VersionKind
from service.deployments.queries import deployed_version, find_model


@dataclass(frozen=True)
class ReferenceStanding:
    """A version against the model's retrain references (service.audit.comparison), described."""

    status: ReferenceMatch
    message: str
    reference: ModelVersion | None
    missing_from_reference: list[int]
    extra_in_reference: list[int]

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
    status: str  # current, stale or missing
    message: str
    evaluation: Evaluation | None
    reference: ReferenceStanding | None  # None when nothing is deployed


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
    status: str  # current, not_evaluated, stale_reference, missing_reference or not_applicable
    message: str
    reference: ReferenceStanding | None
    evaluation: Evaluation | None


def reference_standing(session: Session, version: ModelVersion) -> ReferenceStanding:
    comparison = compare_with_references(session, version)
    return ReferenceStanding(comparison.status, comparison.describe(version), comparison.reference,
                             comparison.missing_from_reference, comparison.extra_in_reference)


def deployment_audit(session: Session, model: Model) -> DeploymentAudit:
    """The deployed version's newest evaluation (else the newest of an earlier version), and where
    the deployed version stands against the references."""
    name, deployed_id = model.name, model.deployed_version_id
    deployed = deployed_version(session, model)
    reference = reference_standing(session, deployed) if deployed is not None else None
    evaluation = matching_evaluation(session, deployed) if deployed is not None else None
    if evaluation is not None:
        return DeploymentAudit(name, deployed_id, "current",
                               f"evaluation of the deployed version {deployed_id} against reference "
                               f"{evaluation.reference_id}, trained without the same "
                               f"{len(deployed.excluded_sample_ids)} samples{erased_note(session, deployed)}",
                               evaluation, reference)
    why = "" if reference is None else f"; {reference.message}"
    earlier = newest_evaluation_of_model(session, name)
    if earlier is None:
        return DeploymentAudit(name, deployed_id, "missing",
                               f"no version of model {name!r} has been evaluated against a retrain reference "
                               f"yet{why}", None, reference)
    return DeploymentAudit(name, deployed_id, "stale",
                           f"the deployed version {deployed_id} has not been evaluated yet; this is the evaluation "
                           f"of the earlier version {earlier.version_id}{why}", earlier, reference)


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
        return audit("not_applicable", f"version {version.id} is a retrain reference: versions are audited against it")
    if not version.excluded_sample_ids:
        return audit("not_applicable", f"version {version.id} excludes no samples: nothing forgotten to audit")
    reference = reference_standing(session, version)
    if reference.status in ("missing", "stale"):
        return audit(f"{reference.status}_reference", f"version {version.id} cannot be audited: {reference.message}",
                     reference)
    evaluation = matching_evaluation(session, version)
    if evaluation is None:
        return audit("not_evaluated", f"{reference.message}, but version {version.id} has not been evaluated against "
                     "it (a worker evaluates the deployed version when a reference is trained)", reference)
    return audit("current", f"evaluation of version {version.id} against reference {evaluation.reference_id}, "
                 f"trained without the same {len(version.excluded_sample_ids)} samples{erased_note(session, version)}",
                 reference, evaluation)


def erased_note(session: Session, version: ModelVersion) -> str:
    """What an evaluation of the version cannot cover: its forgotten samples that were erased since."""
    erased = session.scalar(select(func.count()).select_from(Sample).where(
        Sample.id.in_(version.excluded_sample_ids), Sample.erased_at.is_not(None))) if version.excluded_sample_ids else 0
    if not erased:
        return ""
    return (f"; {erased} of these samples are erased: the forget-set figures (FA, MIA) of evaluations since cover "
            f"the other {len(version.excluded_sample_ids) - erased}, and the erased ones' figures are the evidence "
            "frozen by their forget requests")
