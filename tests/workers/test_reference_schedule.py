"""The retrain reference schedule: when a reference is due, and that the same state is never asked twice.

The due rule is a pure function (tested case by case); the requests it leads to are rows in the
database, tested on SQLite and PostgreSQL with placeholder versions (no training here).
"""

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from service.core.audit_log import verify_chain
from service.core.db import transaction
from service.core.models import AuditEntry, Model, ModelVersion, ReferenceRequest, VersionKind, utcnow
from service.references.schedule import ReferenceState, claim_requests_to_send, reference_due, schedule_references
from service.requests.intake import file_forget_request
from workers.batches.claims import claim_batch
from workers.batches.run import _record_result
from workers.engine import QMulConfig
from workers.references.training import record_reference_failure, train_reference

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


def state(deployed=frozenset({1, 2}), reference=frozenset({1}), age=timedelta(days=1), since=1, open_request=False):
    return ReferenceState(deployed_excluded=deployed, newest_reference_excluded=reference,
                          newest_reference_at=None if reference is None else NOW - age,
                          versions_since_reference=since, open_request=open_request)


@pytest.mark.parametrize(
    ("case", "every_versions", "every_days", "due"),
    [
        (state(), 0, 0, False),  # both bounds off
        (state(since=2), 2, 0, True),  # K versions deployed since the newest reference
        (state(since=1), 2, 0, False),
        (state(age=timedelta(days=7)), 0, 7, True),  # the newest reference is D days old
        (state(age=timedelta(days=7) - timedelta(seconds=1)), 0, 7, False),
        (state(reference=None, since=1), 0, 7, True),  # no reference at all: as old as can be
        (state(reference=None, since=1), 2, 0, False),
        (state(since=5, age=timedelta(days=30), open_request=True), 2, 7, False),  # one is on its way
        (state(reference=frozenset({1, 2}), since=5, age=timedelta(days=30)), 2, 7, False),  # same state
        (state(deployed=frozenset(), reference=None, since=0), 1, 1, False),  # nothing forgotten
    ],
)
def test_a_reference_is_due_when_a_bound_is_met_and_the_state_is_new(case, every_versions, every_days, due):
    assert (reference_due(case, every_versions, every_days, NOW) is not None) is due


def deploy_batch(engine, settings, seed, subject: str) -> int:
    """A batch for the subject's samples, deployed with a placeholder artifact."""
    with transaction(engine) as session:
        file_forget_request(session, subject_id=subject, sample_ids=None, model_name=seed.model,
                            deadline_days=30, actor="test")
    claimed = claim_batch(engine, settings, seed.model)
    metrics = {"FA": 10.0, "RA": 99.0, "TA": 95.0, "MIA": 50.0}
    return _record_result(engine, settings, claimed, sorted(seed.samples[subject]), "/nonexistent/v.pt",
                          "1" * 64, ("qmul", QMulConfig(epochs=1)), metrics, history=[])


def schedule(engine, every_versions=0, every_days=0.0, now=None) -> list[int]:
    with transaction(engine) as session:
        return [r.id for r in schedule_references(session, every_versions, every_days, now or utcnow())]


def record_reference(engine, seed, excluded, request_id=None, created_at=None) -> int:
    """What a worker's train_reference records, with a placeholder artifact."""
    with transaction(engine) as session:
        version = ModelVersion(model_name=seed.model, kind=VersionKind.reference, method="retrain", config={},
                               sha256="2" * 64, artifact_path="/nonexistent/r.pt", excluded_sample_ids=sorted(excluded),
                               created_at=created_at or utcnow())
        session.add(version)
        session.flush()
        if request_id is not None:
            request = session.get(ReferenceRequest, request_id)
            request.reference_version_id, request.finished_at = version.id, utcnow()
        return version.id


@pytest.fixture
def parent_ta(engine, seed):
    with transaction(engine) as session:
        session.get(ModelVersion, seed.version_id).metrics = {"TA": 95.0}


def test_every_k_versions_one_request_per_state(engine, settings, seed, parent_ta):
    deploy_batch(engine, settings, seed, "alice")
    assert schedule(engine, every_versions=2) == []  # one version since (no reference yet): not due
    second = deploy_batch(engine, settings, seed, "bob")
    [request_id] = schedule(engine, every_versions=2)
    assert schedule(engine, every_versions=2) == []  # an open request: not asked twice

    with transaction(engine) as session:
        request = session.get(ReferenceRequest, request_id)
        assert (request.deployed_version_id, request.excluded_sample_count) == (second, 12)
        assert "2 unlearned versions deployed" in request.reason and request.requested_by == "scheduler"
        entry = session.scalars(select(AuditEntry).where(AuditEntry.action == "reference.requested")).one()
        assert entry.details["reference_request_id"] == request_id
        assert verify_chain(session).ok

    # The worker records the reference of that state: still nothing due, the state is the same.
    record_reference(engine, seed, seed.samples["alice"] + seed.samples["bob"], request_id)
    assert schedule(engine, every_versions=1, every_days=0.001, now=utcnow() + timedelta(days=1)) == []
    # One more deployment: K=1 asks again, K=2 waits for a second one.
    deploy_batch(engine, settings, seed, "carol")
    assert schedule(engine, every_versions=2) == []
    assert len(schedule(engine, every_versions=1)) == 1


def test_every_d_days_counts_from_the_newest_reference(engine, settings, seed, parent_ta):
    assert schedule(engine, every_days=7) == []  # nothing forgotten: the original needs no reference
    deploy_batch(engine, settings, seed, "alice")
    record_reference(engine, seed, seed.samples["alice"], created_at=utcnow() - timedelta(days=3))
    deploy_batch(engine, settings, seed, "bob")
    assert schedule(engine, every_days=7) == []  # the newest reference is 3 days old
    [request_id] = schedule(engine, every_days=7, now=utcnow() + timedelta(days=4))
    with transaction(engine) as session:
        assert "days old" in session.get(ReferenceRequest, request_id).reason


def test_a_request_is_sent_once_until_the_broker_would_have_redelivered_it(engine, settings, seed, parent_ta):
    deploy_batch(engine, settings, seed, "alice")
    [request_id] = schedule(engine, every_versions=1)
    resend_after = timedelta(hours=1)
    now = utcnow()
    with transaction(engine) as session:
        assert claim_requests_to_send(session, now, resend_after) == [(request_id, seed.model)]
    with transaction(engine) as session:
        assert claim_requests_to_send(session, now + timedelta(minutes=59), resend_after) == []
    with transaction(engine) as session:  # lost: sent again
        assert claim_requests_to_send(session, now + timedelta(hours=1), resend_after) == [(request_id, seed.model)]
    record_reference(engine, seed, seed.samples["alice"], request_id)
    with transaction(engine) as session:  # closed: never again
        assert claim_requests_to_send(session, now + timedelta(days=1), resend_after) == []


def test_a_closed_request_trains_nothing(engine, settings, seed, parent_ta):
    deploy_batch(engine, settings, seed, "alice")
    [request_id] = schedule(engine, every_versions=1)
    record_reference(engine, seed, seed.samples["alice"], request_id)
    # A duplicate delivery of the same task: returns before loading any data or model.
    assert train_reference(engine, settings, seed.model, request_id) is None
    with transaction(engine) as session:
        assert session.scalar(select(func.count()).select_from(ModelVersion)
                              .where(ModelVersion.kind == VersionKind.reference)) == 1


def test_models_without_a_deployment_are_not_scheduled(engine, settings, seed):
    with transaction(engine) as session:
        session.add(Model(name="untrained", dataset="digits", spec={}))
    deploy_batch(engine, settings, seed, "alice")
    assert len(schedule(engine, every_days=1)) == 1  # only the deployed model
    with transaction(engine) as session:
        assert session.scalars(select(ReferenceRequest.model_name)).all() == [seed.model]


def test_the_reference_command_records_one_request_per_state(engine, settings, seed, parent_ta, monkeypatch, capsys):
    from service.cli import main
    from service.core.settings import get_settings

    monkeypatch.setenv("QFORGET_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("QFORGET_DATA_DIR", str(settings.data_dir))
    get_settings.cache_clear()
    try:
        deploy_batch(engine, settings, seed, "alice")
        assert main(["reference", "--model", seed.model]) == 0
        assert main(["reference", "--model", seed.model]) == 0  # the same state: not asked twice
        assert main(["reference", "--model", "no-such-model"]) == 2
    finally:
        get_settings.cache_clear()
    out = capsys.readouterr()
    assert "requested (request" in out.out and "already requested" in out.out
    assert "'no-such-model' has no deployed version" in out.err
    with transaction(engine) as session:
        [request] = session.scalars(select(ReferenceRequest)).all()
        assert (request.requested_by, request.finished_at) == ("cli", None)


def fail_reference(engine, settings, request_id) -> None:
    """What a worker's train_reference task records when the training raises."""
    record_reference_failure(engine, settings, request_id, RuntimeError("CUDA out of memory"))


def test_a_failing_request_is_sent_again_then_closed_after_its_last_attempt(engine, settings, seed, parent_ta):
    deploy_batch(engine, settings, seed, "alice")
    [request_id] = schedule(engine, every_versions=1)
    resend_after = timedelta(hours=1)
    now = utcnow()
    # What the failed runs' training left to resume from (reference_checkpoint names it).
    leftover = settings.model_store / "checkpoints" / f"reference-{request_id}-0123456789abcdef.pt"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"checkpoint")
    for attempt in range(1, settings.reference_max_attempts + 1):
        with transaction(engine) as session:  # the first send, then each resend after a failure
            sent_at = now + (attempt - 1) * resend_after
            assert claim_requests_to_send(session, sent_at, resend_after) == [(request_id, seed.model)]
        fail_reference(engine, settings, request_id)
        with transaction(engine) as session:
            request = session.get(ReferenceRequest, request_id)
            assert (request.failed_attempts, request.error) == (attempt, "RuntimeError: CUDA out of memory")
            assert (request.finished_at is not None) == (attempt == settings.reference_max_attempts)

    assert not leftover.exists()  # nothing resumes a closed request
    with transaction(engine) as session:
        assert claim_requests_to_send(session, now + timedelta(days=1), resend_after) == []  # closed: never again
        actions = session.scalars(select(AuditEntry.action).where(AuditEntry.action.like("reference.%"))
                                  .order_by(AuditEntry.id)).all()
        assert actions == ["reference.requested", "reference.failed", "reference.failed", "reference.abandoned"]
        assert verify_chain(session).ok
    # The same deployment is not asked for again (it would fail again); a new one is.
    assert schedule(engine, every_versions=1, every_days=0.001, now=utcnow() + timedelta(days=1)) == []
    deploy_batch(engine, settings, seed, "bob")
    assert len(schedule(engine, every_versions=1)) == 1


def test_a_failure_after_the_request_closed_changes_nothing(engine, settings, seed, parent_ta):
    # A late failure of a duplicate delivery, after another delivery recorded the reference.
    deploy_batch(engine, settings, seed, "alice")
    [request_id] = schedule(engine, every_versions=1)
    record_reference(engine, seed, seed.samples["alice"], request_id)
    fail_reference(engine, settings, request_id)
    with transaction(engine) as session:
        request = session.get(ReferenceRequest, request_id)
        assert (request.failed_attempts, request.error, request.reference_version_id is not None) == (0, None, True)
