"""Reads of the audit log and of the evaluations of versions against retrain references."""

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.audit.comparison import ReferenceComparison
from service.core.audit_log import audit_key
from service.core.models import AuditEntry, Evaluation, ModelVersion
from service.core.pseudonyms import pseudonym


def audit_entries_page(
    session: Session,
    *,
    action: str | None = None,
    object_type: str | None = None,
    object_id: str | None = None,
    limit: int,
    offset: int,
) -> tuple[list[AuditEntry], int]:
    """One page of the entries that match every filter given, in the chain's order (oldest
    first); and how many match in all."""
    conditions = []
    if action is not None:
        conditions.append(AuditEntry.action == action)
    if object_type is not None:
        conditions.append(AuditEntry.object_type == object_type)
    if object_id is not None:
        conditions.append(AuditEntry.object_id == object_id)
    count = session.scalar(select(func.count()).select_from(AuditEntry).where(*conditions))
    entries = session.scalars(
        select(AuditEntry).where(*conditions).order_by(AuditEntry.id).limit(limit).offset(offset)
    ).all()
    return list(entries), count


@dataclass(frozen=True)
class SubjectRequestAudit:
    """One of a subject's forget requests, as the audit log tells it."""

    request_id: str
    received_at: datetime
    completed_at: datetime | None
    version_ids: list[int]  # the versions its entries name (those that forgot its samples)


@dataclass(frozen=True)
class SubjectAudit:
    subject_pseudonym: str
    requests: list[SubjectRequestAudit]
    entries: list[AuditEntry]  # every entry about the subject's requests, in the chain's order


def subject_audit(session: Session, subject_id: str) -> SubjectAudit:
    """What the audit log holds about a subject, found by the pseudonym its entries record for it
    (it never records the id): the entries about the requests it filed, received, completed, by
    which versions, when."""
    subject = pseudonym(audit_key(session), "subject", subject_id)
    requests_filed = select(AuditEntry.object_id).where(
        AuditEntry.action == "request.received", AuditEntry.details["subject_pseudonym"].as_string() == subject
    )
    entries = session.scalars(
        select(AuditEntry)
        .where(AuditEntry.object_type == "forget_request", AuditEntry.object_id.in_(requests_filed))
        .order_by(AuditEntry.id)
    ).all()
    by_request: dict[str, list[AuditEntry]] = {}
    for entry in entries:
        by_request.setdefault(entry.object_id, []).append(entry)
    return SubjectAudit(
        subject_pseudonym=subject,
        requests=[_request_audit(request_id, its_entries) for request_id, its_entries in by_request.items()],
        entries=list(entries),
    )


def _request_audit(request_id: str, entries: list[AuditEntry]) -> SubjectRequestAudit:
    at = {entry.action: entry.created_at for entry in entries}
    return SubjectRequestAudit(
        request_id=request_id,
        received_at=at["request.received"],
        completed_at=at.get("request.completed"),
        version_ids=sorted({entry.details["version_id"] for entry in entries if "version_id" in entry.details}),
    )


def matching_evaluation(session: Session, version: ModelVersion, comparison: ReferenceComparison) -> Evaluation | None:
    """The version's newest evaluation against the kind of reference the audit uses for it
    (comparison, service.audit.comparison's for this version): against a full reference that
    excludes exactly its samples once one exists, even before it is evaluated against it; else
    against an approximate one (interim)."""
    if comparison.status != "matching":
        return None
    excluded = set(version.excluded_sample_ids)
    evaluations = session.execute(
        select(Evaluation, ModelVersion.excluded_sample_ids, ModelVersion.approximate)
        .join(ModelVersion, ModelVersion.id == Evaluation.reference_id)
        .where(Evaluation.version_id == version.id)
        .order_by(Evaluation.created_at.desc(), Evaluation.id.desc())
    ).all()
    return next((evaluation for evaluation, reference_excluded, approximate in evaluations
                 if set(reference_excluded) == excluded and approximate == comparison.approximate), None)


def newest_evaluation_of_model(session: Session, model_name: str) -> Evaluation | None:
    """The newest evaluation of any of the model's versions."""
    return session.scalars(
        select(Evaluation)
        .join(ModelVersion, ModelVersion.id == Evaluation.version_id)
        .where(ModelVersion.model_name == model_name)
        .order_by(Evaluation.created_at.desc(), Evaluation.id.desc())
        .limit(1)
    ).first()
