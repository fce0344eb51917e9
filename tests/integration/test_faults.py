"""Fault injection against the real stack: a worker killed mid-run, Redis stopped mid-flow, two
workers on one model. Whatever dies when, every request completes exactly once and the deployed
version is the newest in an unbroken lineage (docs/design.md, invariants 1, 3 and 7)."""

import subprocess
import time

import pytest
import redis
from sqlalchemy import func, select

from service.core.audit_log import verify_chain
from service.core.db import transaction
from service.core.models import AuditEntry, Batch, BatchStatus, ForgetRequest, Model, ModelVersion

pytestmark = pytest.mark.integration

REDIS_START = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
               "--save", "", "--appendonly", "no"]


def assert_exactly_once(stack, request_ids: list[str]) -> list[Batch]:
    """Each request completed once, with a part per model, each completed by a completed batch of
    its model; each model's batches chain parent to result. Returns the default model's batches."""
    with transaction(stack.engine) as session:
        completions = session.scalars(select(AuditEntry.object_id).where(AuditEntry.action == "request.completed")).all()
        assert sorted(completions) == sorted(request_ids)
        models = session.scalars(select(Model).order_by(Model.name)).all()
        batches_of = {}
        for model in models:
            batches = session.scalars(select(Batch).where(Batch.model_name == model.name,
                                                         Batch.status == BatchStatus.completed).order_by(Batch.id)).all()
            assert session.get(ModelVersion, batches[0].parent_version_id).kind.value == "original"
            for earlier, later in zip(batches, batches[1:]):
                assert later.parent_version_id == earlier.result_version_id
            assert model.deployed_version_id == batches[-1].result_version_id
            batches_of[model.name] = batches
        assert session.scalar(select(func.count()).select_from(Batch).where(Batch.status == BatchStatus.running)) == 0
        for request_id in request_ids:
            parts = session.get(ForgetRequest, request_id).parts
            assert sorted(part.model_name for part in parts) == [model.name for model in models]
            assert all(part.completed_version_id == part.batch.result_version_id for part in parts)
        assert verify_chain(session).ok
        return batches_of[stack.settings.default_model]


def batch_started(stack) -> bool:
    with transaction(stack.engine) as session:
        return bool(session.scalar(select(func.count()).select_from(Batch).where(Batch.status == BatchStatus.running)))


def test_a_worker_killed_mid_run_is_replaced_and_nothing_is_applied_twice(make_stack):
    # Short leases so the takeover comes quickly; runs long enough to be killed in the middle. Two
    # models: each request fans out to both, and the killed run is one of them.
    stack = make_stack(models=2, lease_seconds=3, unlearn_epochs=10)
    stack.services.start("worker-a", "worker")
    stack.services.start("scheduler", "scheduler")
    client = stack.client()
    request_ids = stack.file_requests(client, ["subject-0001", "subject-0002", "subject-0003"])
    stack.services.wait_until(lambda: batch_started(stack), "a batch to start", timeout=120)
    time.sleep(2)  # inside the Q-MUL epochs
    stack.services.kill("worker-a")
    stack.services.start("worker-b", "worker")

    stack.wait_for_completion(client, request_ids)
    assert_exactly_once(stack, request_ids)
    with transaction(stack.engine) as session:
        batches = session.scalars(select(Batch).order_by(Batch.id)).all()
        takeovers = session.scalars(select(AuditEntry).where(AuditEntry.action == "batch.lease_taken_over")).all()
    # The killed attempt, then the takeover from the same parent; one batch per model.
    assert sorted(batch.model_name for batch in batches) == sorted({batch.model_name for batch in batches})
    assert {entry.object_id for entry in takeovers} == {str(batch.id) for batch in batches if batch.attempts == 2}
    assert takeovers


def test_a_redis_outage_loses_no_request(make_stack):
    stack = make_stack(models=2)
    stack.services.start("worker", "worker")
    stack.services.start("scheduler", "scheduler")
    client = stack.client()
    broker = redis.Redis(host="127.0.0.1", port=6379)
    try:
        broker.shutdown(nosave=True)
    except redis.ConnectionError:
        pass  # the server closes the connection as it goes down
    try:
        # The database is the source of truth: intake goes on while the broker is away.
        request_ids = stack.file_requests(client, ["subject-0004", "subject-0005"])
        time.sleep(3)
    finally:
        subprocess.run(REDIS_START, check=True)
        for _ in range(50):
            try:
                broker.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
    # The restarted Redis kept nothing; the scheduler sends the wake-up again.
    stack.wait_for_completion(client, request_ids)
    assert_exactly_once(stack, request_ids)


def test_two_workers_on_one_model_run_one_batch_at_a_time(make_stack):
    stack = make_stack(unlearn_epochs=4)
    stack.services.start("worker-a", "worker", "--hostname", "a@%h")
    stack.services.start("worker-b", "worker", "--hostname", "b@%h")
    stack.services.start("scheduler", "scheduler")
    client = stack.client()
    first_wave = stack.file_requests(client, ["subject-0006", "subject-0007"])
    stack.services.wait_until(lambda: batch_started(stack), "a batch to start", timeout=120)
    second_wave = stack.file_requests(client, ["subject-0008", "subject-0009"])  # arrives mid-run

    stack.wait_for_completion(client, first_wave + second_wave)
    batches = assert_exactly_once(stack, first_wave + second_wave)
    assert len(batches) >= 2  # the second wave waited for the next batch
    for earlier, later in zip(batches, batches[1:]):
        assert earlier.finished_at <= later.created_at  # never two runs of one model at once
