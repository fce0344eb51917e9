"""Retrain references: when one is due, and asking for one.

Database work only (no model code), inside the caller's transaction: the API's admin route and
the scheduler ask for references here (which reference a version is audited against:
service/audit/comparison.py).

A reference is asked for by a `ReferenceRequest` row; the scheduler sends the training task for
it (workers/tasks.py), the worker records the reference and closes the request. The schedule
(QFORGET_REFERENCE_EVERY_VERSIONS, QFORGET_REFERENCE_EVERY_DAYS) asks for a reference when the
deployment has forgotten samples that the newest reference still holds, and K unlearned versions
were deployed since, or the newest reference is D days old. It never asks while a request for
the model is open, nor when the newest reference already excludes exactly what the deployed
version excludes: the same state is never trained twice.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.core.audit_log import append_audit
from service.core.models import Batch, BatchStatus, Model, ModelVersion, ReferenceRequest, VersionKind, as_utc, utcnow


@dataclass(frozen=True)
class ReferenceState:
    """What the schedule looks at for one model."""

    deployed_excluded: frozenset[int]
    newest_reference_excluded: frozenset[int] | None  # None: no reference yet
    newest_reference_at: datetime | None
    versions_since_reference: int  # deployed unlearned versions that forgot more than the newest reference
    open_request: bool
    # The newest closed request was abandoned (failed every attempt) for this very deployment:
    # asking again would fail again; a new deployment, or an admin, asks again.
    abandoned_for_deployment: bool = False


def reference_due(state: ReferenceState, every_versions: int, every_days: float, now: datetime) -> str | None:
    """Why a new reference is due, or None. 0 turns a bound off."""
    # One is on its way, this state failed every attempt, or nothing is forgotten (the original is
    # its own reference).
    if state.open_request or state.abandoned_for_deployment or not state.deployed_excluded:
        return None
    if state.newest_reference_excluded == state.deployed_excluded:
        return None  # the newest reference is of this very state
    if every_versions and state.versions_since_reference >= every_versions:
        return (f"{state.versions_since_reference} unlearned versions deployed since the newest reference "
                f"(QFORGET_REFERENCE_EVERY_VERSIONS={every_versions})")
    if every_days:
        if state.newest_reference_at is None:
            return f"no reference yet (QFORGET_REFERENCE_EVERY_DAYS={every_days:g})"
        age = now - state.newest_reference_at
        if age >= timedelta(days=every_days):
            return (f"the newest reference is {age / timedelta(days=1):.1f} days old "
                    f"(QFORGET_REFERENCE_EVERY_DAYS={every_days:g})")
    return None


def newest_reference(session: Session, model_name: str) -> ModelVersion | None:
    """The newest full reference: an approximate one (a coreset's) stands in for a state's reference
    without making it due later; its request stays open until the full one is recorded."""
    return session.scalars(
        select(ModelVersion)
        .where(ModelVersion.model_name == model_name, ModelVersion.kind == VersionKind.reference,
               ModelVersion.approximate.is_(False))
        .order_by(ModelVersion.id.desc())
        .limit(1)
    ).first()


def open_request(session: Session, model_name: str) -> ReferenceRequest | None:
    return session.scalars(
        select(ReferenceRequest)
        .where(ReferenceRequest.model_name == model_name, ReferenceRequest.finished_at.is_(None))
        .order_by(ReferenceRequest.id)
        .limit(1)
    ).first()


def last_closed_request(session: Session, model_name: str) -> ReferenceRequest | None:
    return session.scalars(
        select(ReferenceRequest)
        .where(ReferenceRequest.model_name == model_name, ReferenceRequest.finished_at.is_not(None))
        .order_by(ReferenceRequest.id.desc())
        .limit(1)
    ).first()


def reference_state(session: Session, model: Model) -> ReferenceState:
    deployed = session.get(ModelVersion, model.deployed_version_id)
    reference = newest_reference(session, model.name)
    reference_excluded = None if reference is None else frozenset(reference.excluded_sample_ids)
    excluded_count = func.coalesce(func.json_array_length(ModelVersion.excluded_sample_ids), 0)
    # Versions deployed by a batch (including an approved held one); rollbacks deploy no new version.
    versions_since = session.scalar(
        select(func.count())
        .select_from(ModelVersion)
        .join(Batch, Batch.result_version_id == ModelVersion.id)
        .where(ModelVersion.model_name == model.name, ModelVersion.kind == VersionKind.unlearned,
               Batch.status == BatchStatus.completed, excluded_count > len(reference_excluded or ()))
    )
    closed = last_closed_request(session, model.name)
    return ReferenceState(
        deployed_excluded=frozenset(deployed.excluded_sample_ids),
        newest_reference_excluded=reference_excluded,
        newest_reference_at=None if reference is None else as_utc(reference.created_at),
        versions_since_reference=versions_since,
        open_request=open_request(session, model.name) is not None,
        abandoned_for_deployment=(closed is not None and closed.reference_version_id is None
                                  and closed.deployed_version_id == model.deployed_version_id),
    )


def request_reference(session: Session, model: Model, actor: str, reason: str) -> ReferenceRequest:
    """Record that a reference of the model's current state is wanted (the scheduler sends it)."""
    deployed = session.get(ModelVersion, model.deployed_version_id) if model.deployed_version_id else None
    request = ReferenceRequest(
        model_name=model.name,
        requested_at=utcnow(),
        requested_by=actor,
        reason=reason,
        deployed_version_id=model.deployed_version_id,
        excluded_sample_count=len(deployed.excluded_sample_ids) if deployed else 0,
    )
    session.add(request)
    session.flush()
    append_audit(session, actor=actor, action="reference.requested", object_type="model", object_id=model.name,
                 details={"reference_request_id": request.id, "reason": reason,
                          "deployed_version_id": request.deployed_version_id,
                          "excluded_samples": request.excluded_sample_count})
    return request


def ask_for_reference(session: Session, model: Model, actor: str, reason: str) -> tuple[ReferenceRequest, bool]:
    """The open request for the model's current deployment, else a new one; and whether it is new.
    An open request for the same deployment is the same work: given back, not asked for twice."""
    request = open_request(session, model.name)
    if request is not None and request.deployed_version_id == model.deployed_version_id:
        return request, False
    return request_reference(session, model, actor, reason), True


def schedule_references(session: Session, every_versions: int, every_days: float, now: datetime,
                        actor: str = "scheduler") -> list[ReferenceRequest]:
    """Ask for a reference for every deployed model that is due. Returns the new requests."""
    if not every_versions and not every_days:
        return []
    requested = []
    models = session.scalars(
        select(Model).where(Model.deployed_version_id.is_not(None)).order_by(Model.name)
        # Two dispatches at once must not both ask; a model another transaction holds waits a tick.
        .with_for_update(skip_locked=True)
    ).all()
    for model in models:
        reason = reference_due(reference_state(session, model), every_versions, every_days, now)
        if reason is not None:
            requested.append(request_reference(session, model, actor, reason))
    return requested


def claim_requests_to_send(session: Session, now: datetime, resend_after: timedelta) -> list[tuple[int, str]]:
    """Open requests never sent, or sent longer ago than the broker would take to redeliver (the
    task was lost): marked sent now. Returns (request id, model name) pairs to send."""
    requests = session.scalars(
        select(ReferenceRequest)
        .where(ReferenceRequest.finished_at.is_(None),
               ReferenceRequest.sent_at.is_(None) | (ReferenceRequest.sent_at <= now - resend_after))
        .order_by(ReferenceRequest.id)
        .with_for_update(skip_locked=True)
    ).all()
    for request in requests:
        request.sent_at = now
    return [(request.id, request.model_name) for request in requests]
