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
    SampleScore,
    VersionKind,
    WebhookDelivery,
    utcnow,
)
from service.core.settings import Settings
from service.requests import lifecycle
from service.requests.intake import file_forget_request
from service.webhooks.config import WebhookConfig, with_webhooks


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


@pytest.fixture
def hooked(engine, tmp_path):
    """The engine, carrying a webhook endpoint (nothing is sent here: the events are only recorded)."""
    settings = Settings(webhook_url="http://127.0.0.1:9/hooks", data_dir=tmp_path, _env_file=None)
    return with_webhooks(engine, WebhookConfig.from_settings(settings))


def events(engine) -> list[tuple[str, dict]]:
    with transaction(engine) as session:
        rows = session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.created_at)).all()
        return [(row.event_type, row.payload["data"]) for row in rows]


def test_completing_records_request_completed_with_the_evidence_summary(hooked, seed, batch_id):
    with transaction(hooked) as session:
        batch = session.get(Batch, batch_id)
        [request_id] = session.scalars(select(ForgetRequest.id)).all()
        after = ModelVersion(model_name=seed.model, kind=VersionKind.unlearned, parent_id=seed.version_id,
                             batch_id=batch_id, method="qmul", config={}, metrics={}, sha256="1" * 64,
                             artifact_path="/nonexistent/after.pt", excluded_sample_ids=seed.samples["alice"])
        session.add(after)
        session.flush()
        alice = seed.samples["alice"]
        # Before: right on every sample and called a member of all; after: right on 2 of 6, a member of 1.
        session.add_all([SampleScore(version_id=seed.version_id, sample_id=s, correct=True, confidence=0.9,
                                     member=True) for s in alice])
        session.add_all([SampleScore(version_id=after.id, sample_id=s, correct=i < 2, confidence=0.2,
                                     member=i < 1) for i, s in enumerate(alice)])
        session.flush()
        lifecycle.complete(session, batch, after, "test", utcnow())
        after_id = after.id
    [(event_type, data)] = events(hooked)
    assert event_type == "request.completed" and data["request_id"] == request_id
    [part] = data["parts"]
    assert (part["model"], part["version_id"], part["parent_version_id"]) == (seed.model, after_id, seed.version_id)
    assert part["before"] == {"version_id": seed.version_id, "sample_count": 6, "forget_accuracy": 100.0,
                              "member_share": 100.0}
    assert part["after"] == {"version_id": after_id, "sample_count": 6, "forget_accuracy": 33.33,
                             "member_share": 16.67}


def test_holding_records_nothing_and_giving_up_records_request_failed(hooked, seed, batch_id):
    apply(hooked, lifecycle.hold, batch_id, "version", "test accuracy fell", "test")
    apply(hooked, lifecycle.discard, batch_id, "test", None)
    assert events(hooked) == []
    with transaction(hooked) as session:
        parts = session.scalars(select(ForgetRequestPart)).all()
        batch = lifecycle.claim(session, parts, seed.model, seed.version_id, "test-worker",
                                utcnow() + timedelta(minutes=5), actor="test")
        second, request_id = batch.id, parts[0].request_id
    apply(hooked, lifecycle.give_up, second, "worker lost three times", "test")
    [(event_type, data)] = events(hooked)
    assert event_type == "request.failed"
    assert data == {"request_id": request_id, "model": seed.model, "batch_id": second,
                    "error": "worker lost three times", "part_status": "pending"}
