"""When a model's pending requests make a batch: the batch policy and the scheduler's query.

A model is due when the samples of its pending parts reach `min_samples`, or its oldest pending request has
waited `max_wait_seconds`, or a pending request's due date is within `due_margin_days`. Batching
amortises a run's fixed cost (loading, gradient-norm passes, evaluation) over many requests,
and the two time bounds keep a quiet model from holding requests back.

A due date is a request's `due_at`, extended or not. A linked request that relies on another's
pending part (service.requests.lifecycle) lends that part its own due date when it is earlier:
extending one request must not push back another that waits for it. Withdrawn parts are not
pending, and count for nothing.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from pydantic import BaseModel
from sqlalchemy import Connection, func, select
from sqlalchemy.orm import aliased

from service.core.models import Batch, BatchStatus, ForgetRequest, ForgetRequestPart, ForgetRequestSample, Model, as_utc
from service.requests.lifecycle import CLAIMABLE_STATUSES, OPEN_STATUSES


class BatchPolicy(BaseModel):
    min_samples: int = 50
    max_wait_seconds: float = 600.0
    due_margin_days: float = 3.0


@dataclass(frozen=True)
class PendingStats:
    model_name: str
    samples: int
    oldest_received_at: datetime
    earliest_due_at: datetime


def is_due(stats: PendingStats, policy: BatchPolicy, now: datetime) -> bool:
    return (
        stats.samples >= policy.min_samples
        or now - stats.oldest_received_at >= timedelta(seconds=policy.max_wait_seconds)
        or stats.earliest_due_at - now <= timedelta(days=policy.due_margin_days)
    )


def pending_stats(connection: Connection) -> list[PendingStats]:
    """One aggregate query: per model, the samples of its pending parts' requests (an upper bound of
    what it will forget: a sample of another data set counts too), oldest receipt, earliest due date."""
    rows = connection.execute(
        select(
            ForgetRequestPart.model_name,
            func.count(ForgetRequestSample.sample_id),
            func.min(ForgetRequest.received_at),
            func.min(ForgetRequest.due_at),
        )
        .join(ForgetRequest, ForgetRequest.id == ForgetRequestPart.request_id)
        .join(ForgetRequestSample, ForgetRequestSample.request_id == ForgetRequest.id)
        .where(ForgetRequestPart.status.in_(CLAIMABLE_STATUSES))
        .group_by(ForgetRequestPart.model_name)
    ).all()
    lent = _due_dates_of_linked_requests(connection)
    return [PendingStats(name, samples, as_utc(oldest), min(as_utc(due), lent.get(name, as_utc(due))))
            for name, samples, oldest, due in rows]


def _due_dates_of_linked_requests(connection: Connection) -> dict[str, datetime]:
    """Per model, the earliest due date of an open linked request that shares a sample with an
    earlier request's pending part of that model, for a model it goes to: the part it waits for."""
    follower, mine, theirs = aliased(ForgetRequest), aliased(ForgetRequestSample), aliased(ForgetRequestSample)
    rows = connection.execute(
        select(ForgetRequestPart.model_name, func.min(follower.due_at))
        .join(ForgetRequest, ForgetRequest.id == ForgetRequestPart.request_id)
        .join(theirs, theirs.request_id == ForgetRequest.id)
        .join(mine, mine.sample_id == theirs.sample_id)
        .join(follower, follower.id == mine.request_id)
        .where(ForgetRequestPart.status.in_(CLAIMABLE_STATUSES), follower.linked_request_id.is_not(None),
               follower.status.in_(OPEN_STATUSES), follower.id != ForgetRequest.id,
               follower.received_at >= ForgetRequest.received_at,
               follower.model_name.is_(None) | (follower.model_name == ForgetRequestPart.model_name))
        .group_by(ForgetRequestPart.model_name)
    ).all()
    return {name: as_utc(due) for name, due in rows}


def due_models(connection: Connection, policies: dict[str, BatchPolicy], default: BatchPolicy,
               now: datetime, failed_cooldown: timedelta) -> list[str]:
    """Models to wake a worker for: due pending work, or a running batch whose lease expired."""
    deployed = set(connection.scalars(select(Model.name).where(Model.deployed_version_id.is_not(None))))
    leases = {name: as_utc(expires) for name, expires in connection.execute(
        select(Batch.model_name, Batch.lease_expires_at).where(Batch.status == BatchStatus.running))}
    due = {name for name, expires in leases.items() if expires <= now}
    # No new batch while a run is alive (new requests wait for the next batch), while a held batch
    # waits for review, or for a while after a batch failed for good (it would likely fail again).
    blocked = set(leases) | set(connection.scalars(
        select(Batch.model_name).where(
            (Batch.status == BatchStatus.held)
            | ((Batch.status == BatchStatus.failed) & (Batch.finished_at > now - failed_cooldown))
        )
    ))
    for stats in pending_stats(connection):
        if stats.model_name not in blocked and is_due(stats, policies.get(stats.model_name, default), now):
            due.add(stats.model_name)
    return sorted(due & deployed)
