"""The request, part and batch state machine (service.requests.lifecycle), on SQLite and PostgreSQL:
each transition moves only from the state it starts from, settles the requests' statuses from their
parts', and leaves its audit entry."""

from datetime import timedelta

import pytest
from sqlalchemy import select

from service.core.db import transaction
from service.core.models import (
    AuditEntry,
    Batch,
    BatchStatus,
    ForgetRequest,
    ForgetRequestPart,
    ModelVersion,
    RequestStatus,
    utcnow,
)
from service.requests import lifecycle
from service.requests.intake import file_forget_request


@pytest.fixture
def batch_id(engine, seed) -> int:
    """A running batch holding one request for subject alice."""
    with transaction(engine) as session:
        file_forget_request(session, subject_id="alice", sample_ids=None, model_name=seed.model,
                            deadline_days=30, actor="test")
    with transaction(engine) as session:
        parts = session.scalars(select(ForgetRequestPart)).all()
        batch = lifecycle.claim(session, parts, seed.model, seed.version_id, "test-worker",
                                utcnow() + timedelta(minutes=5), actor="test")
        return batch.id


def statuses(engine, batch_id):
    with transaction(engine) as session:
        batch = session.get(Batch, batch_id)
        parts = session.scalars(select(ForgetRequestPart)).all()
        [request] = session.scalars(select(ForgetRequest)).all()
        assert request.status == parts[0].status  # one part: the request's status is its part's
        return batch.status, [(p.status, p.batch_id) for p in parts]


def actions(engine) -> list[str]:
    with transaction(engine) as session:
        return session.scalars(select(AuditEntry.action).order_by(AuditEntry.id)).all()


def apply(engine, transition, batch_id, *args):
    with transaction(engine) as session:
        batch = session.get(Batch, batch_id)
        version = session.get(ModelVersion, batch.parent_version_id)
        arguments = [version if arg == "version" else arg for arg in args]
        transition(session, batch, *arguments)


def test_claim_batches_pending_requests_and_refuses_batched_ones(engine, seed, batch_id):
    assert statuses(engine, batch_id) == (BatchStatus.running, [(RequestStatus.batched, batch_id)])
    assert actions(engine)[-1] == "batch.claimed"
    with transaction(engine) as session, pytest.raises(lifecycle.TransitionRefused):
        lifecycle.claim(session, session.scalars(select(ForgetRequestPart)).all(), seed.model, seed.version_id,
                        "test-worker", utcnow(), actor="test")


def test_hold_then_complete_on_approval(engine, batch_id):
    apply(engine, lifecycle.hold, batch_id, "version", "test accuracy fell", "test")
    assert statuses(engine, batch_id) == (BatchStatus.held, [(RequestStatus.pending, batch_id)])
    with pytest.raises(lifecycle.TransitionRefused, match="is held, not running"):
        apply(engine, lifecycle.hold, batch_id, "version", "again", "test")
    apply(engine, lifecycle.complete, batch_id, "version", "test", utcnow())
    assert statuses(engine, batch_id) == (BatchStatus.completed, [(RequestStatus.completed, batch_id)])
    assert actions(engine)[-4:] == ["batch.held", "request.part_completed", "request.completed", "batch.completed"]


def test_discard_releases_the_requests_and_only_from_held(engine, batch_id):
    with pytest.raises(lifecycle.TransitionRefused, match="is running, not held"):
        apply(engine, lifecycle.discard, batch_id, "test", None)
    apply(engine, lifecycle.hold, batch_id, "version", "test accuracy fell", "test")
    apply(engine, lifecycle.discard, batch_id, "test", {"epochs": 3})
    assert statuses(engine, batch_id) == (BatchStatus.discarded, [(RequestStatus.pending, None)])
    assert actions(engine)[-1] == "batch.discarded"


def test_give_up_returns_the_requests_with_the_error(engine, batch_id):
    apply(engine, lifecycle.give_up, batch_id, "worker lost three times", "test")
    assert statuses(engine, batch_id) == (BatchStatus.failed, [(RequestStatus.pending, None)])
    with transaction(engine) as session:
        assert session.scalars(select(ForgetRequestPart.error)).one() == "worker lost three times"
    with pytest.raises(lifecycle.TransitionRefused, match="is failed, not running or held"):
        apply(engine, lifecycle.complete, batch_id, "version", "test", utcnow())
    assert actions(engine)[-1] == "batch.failed"
