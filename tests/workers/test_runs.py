"""Batch claiming, leases, the quality gate and admin decisions, on SQLite and PostgreSQL.

No training here: results are recorded with a placeholder artifact, which is all the database
side needs. The engine is covered in tests/engine, the whole path in tests/integration.
"""

import threading
import typing
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from service.core.audit_log import verify_chain
from service.core.db import transaction
from service.core.models import (
    AuditEntry,
    Batch,
    BatchStatus,
    ForgetRequest,
    ForgetRequestPart,
    ForgottenSample,
    Model,
    ModelVersion,
    RequestStatus,
    Sample,
    utcnow,
)
from service.core.settings import QMUL_METHODS, UnlearnMethod
from service.deployments import deploy as deployments
from service.deployments.retention import prune_artifacts
from service.requests.intake import file_forget_request
from workers.batches.claims import claim_batch, record_failure
from workers.batches.run import _record_result, unlearn_config
from workers.engine import FTConfig, QMulConfig
from workers.engine.methods import UNLEARNING_METHODS


def in_transaction(engine, action, *args, **kwargs):
    with transaction(engine) as session:
        return action(session, *args, **kwargs)


def file_request(engine, seed, subject: str) -> str:
    with transaction(engine) as session:
        return file_forget_request(session, subject_id=subject, sample_ids=None, model_name=seed.model,
                                   deadline_days=30, actor="test").request.id


def finish_run(engine, settings, claimed, ta: float) -> int | None:
    """What run_batch does after training, with a placeholder artifact and the given test accuracy."""
    with transaction(engine) as session:
        forget_ids = session.scalars(select(Sample.id).join(ForgetRequest.samples).join(ForgetRequest.parts)
                                     .where(ForgetRequestPart.batch_id == claimed.batch_id)).all()
    metrics = {"FA": 10.0, "RA": 99.0, "TA": ta, "MIA": 50.0}
    return _record_result(engine, settings, claimed, sorted(forget_ids), "/nonexistent/new.pt", "1" * 64,
                          ("qmul", QMulConfig(epochs=1)), metrics, history=[])


@pytest.fixture
def parent_ta(engine, seed) -> float:
    with transaction(engine) as session:
        session.get(ModelVersion, seed.version_id).metrics = {"TA": 95.0}
    return 95.0


def test_a_claimed_batch_deploys_once_and_completes_its_requests(engine, settings, seed, parent_ta):
    request_ids = [file_request(engine, seed, "alice"), file_request(engine, seed, "bob")]
    claimed = claim_batch(engine, settings, seed.model)
    assert claimed.parent_version_id == seed.version_id
    late = file_request(engine, seed, "carol")  # arrives during the run: waits for the next batch

    version_id = finish_run(engine, settings, claimed, ta=parent_ta - 1)
    assert version_id is not None
    assert finish_run(engine, settings, claimed, ta=parent_ta - 1) is None  # a second delivery deploys nothing

    with transaction(engine) as session:
        assert session.get(Model, seed.model).deployed_version_id == version_id
        for request_id in request_ids:
            request = session.get(ForgetRequest, request_id)
            [part] = request.parts
            assert (request.status, part.completed_version_id) == (RequestStatus.completed, version_id)
        assert session.get(ForgetRequest, late).status == RequestStatus.pending
        forgotten = set(session.scalars(select(ForgottenSample.sample_id).where(ForgottenSample.model_name == seed.model)))
        assert forgotten == set(seed.samples["alice"] + seed.samples["bob"])
        assert set(session.get(ModelVersion, version_id).excluded_sample_ids) == forgotten
        assert session.scalar(select(func.count()).select_from(AuditEntry)
                              .where(AuditEntry.action == "request.completed")) == 2
        assert verify_chain(session).ok


def test_one_run_per_model_at_a_time(engine, settings, seed):
    file_request(engine, seed, "alice")
    assert claim_batch(engine, settings, seed.model) is not None
    file_request(engine, seed, "bob")
    assert claim_batch(engine, settings, seed.model) is None  # the lease is alive


def test_concurrent_claims_make_one_batch(engine, settings, seed):
    for subject in ("alice", "bob", "carol"):
        file_request(engine, seed, subject)
    results, start = [], threading.Barrier(4)

    def claim():
        start.wait()
        results.append(claim_batch(engine, settings, seed.model))

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len([r for r in results if r is not None]) == 1
    with transaction(engine) as session:
        assert session.scalar(select(func.count()).select_from(Batch)) == 1
        assert {r.status for r in session.scalars(select(ForgetRequest))} == {RequestStatus.batched}


def expire_lease(engine, batch_id: int) -> None:
    with transaction(engine) as session:
        session.execute(update(Batch).where(Batch.id == batch_id)
                        .values(lease_expires_at=utcnow() - timedelta(seconds=1), lease_owner="dead-worker"))


def test_an_expired_lease_is_taken_over_from_the_same_parent_then_given_up(engine, settings, seed):
    request_id = file_request(engine, seed, "alice")
    first = claim_batch(engine, settings, seed.model)
    for attempt in range(2, settings.max_attempts + 1):
        expire_lease(engine, first.batch_id)
        again = claim_batch(engine, settings, seed.model)
        assert again == first  # same batch, same parent version
        with transaction(engine) as session:
            assert session.get(Batch, first.batch_id).attempts == attempt
    expire_lease(engine, first.batch_id)
    assert claim_batch(engine, settings, seed.model) is None  # attempts exhausted
    with transaction(engine) as session:
        batch = session.get(Batch, first.batch_id)
        request = session.get(ForgetRequest, request_id)
        assert batch.status == BatchStatus.failed
        # Never silently dropped: back to pending, with the error.
        assert request.status == RequestStatus.pending and request.parts[0].batch_id is None
        assert "abandoned" in request.parts[0].error


def test_a_failed_attempt_backs_off_then_is_retried(engine, settings, seed):
    file_request(engine, seed, "alice")
    claimed = claim_batch(engine, settings, seed.model)
    record_failure(engine, settings, claimed, RuntimeError("CUDA out of memory"))
    assert claim_batch(engine, settings, seed.model) is None  # backing off
    with transaction(engine) as session:
        batch = session.get(Batch, claimed.batch_id)
        assert batch.error == "RuntimeError: CUDA out of memory" and batch.lease_owner is None
    expire_lease(engine, claimed.batch_id)
    assert claim_batch(engine, settings, seed.model) == claimed


def test_the_quality_gate_holds_a_version_until_an_admin_approves(engine, settings, seed, parent_ta):
    request_id = file_request(engine, seed, "alice")
    claimed = claim_batch(engine, settings, seed.model)
    drop = settings.quality_gate_max_ta_drop + 1
    assert finish_run(engine, settings, claimed, ta=parent_ta - drop) is None
    with transaction(engine) as session:
        batch = session.get(Batch, claimed.batch_id)
        assert batch.status == BatchStatus.held and "test accuracy fell" in batch.hold_reason
        assert session.get(ForgetRequest, request_id).status == RequestStatus.pending
        assert session.get(Model, seed.model).deployed_version_id == seed.version_id
    file_request(engine, seed, "bob")
    assert claim_batch(engine, settings, seed.model) is None  # the model waits for the review

    version_id = in_transaction(engine, deployments.approve_batch, claimed.batch_id, actor="key:admin")
    with transaction(engine) as session:
        assert session.get(Model, seed.model).deployed_version_id == version_id
        request = session.get(ForgetRequest, request_id)
        assert (request.status, request.parts[0].completed_version_id) == (RequestStatus.completed, version_id)
    with pytest.raises(deployments.AdminRefusal, match="not held"):
        in_transaction(engine, deployments.approve_batch, claimed.batch_id, actor="key:admin")


def test_a_discarded_batch_returns_its_requests_with_new_settings(engine, settings, seed, parent_ta):
    request_id = file_request(engine, seed, "alice")
    claimed = claim_batch(engine, settings, seed.model)
    finish_run(engine, settings, claimed, ta=0.0)
    in_transaction(engine, deployments.discard_batch, claimed.batch_id, actor="key:admin",
                   new_config={"epochs": 3, "lr": 0.001})
    with transaction(engine) as session:
        assert session.get(Batch, claimed.batch_id).status == BatchStatus.discarded
        request = session.get(ForgetRequest, request_id)
        assert (request.status, request.parts[0].batch_id) == (RequestStatus.pending, None)
        model = session.get(Model, seed.model)
        assert unlearn_config(settings, model) == ("qmul", QMulConfig(
            epochs=3, lr=0.001, grad_norm_batches=settings.unlearn_grad_norm_batches))
        # 0 asks for the full pass over each set.
        full = settings.model_copy(update={"unlearn_grad_norm_batches": 0})
        assert unlearn_config(full, model)[1].grad_norm_batches is None
    assert claim_batch(engine, settings, seed.model) is not None


def test_rollback_only_to_a_version_that_forgot_everything(engine, settings, seed, parent_ta):
    file_request(engine, seed, "alice")
    first = finish_run(engine, settings, claim_batch(engine, settings, seed.model), ta=parent_ta)
    file_request(engine, seed, "bob")
    second = finish_run(engine, settings, claim_batch(engine, settings, seed.model), ta=parent_ta)
    for target in (seed.version_id, first):
        with pytest.raises(deployments.AdminRefusal, match="bring them back"):
            in_transaction(engine, deployments.rollback, seed.model, target, actor="key:admin")
    with transaction(engine) as session:
        assert session.get(Model, seed.model).deployed_version_id == second
        # An equivalent version that forgot everything is a valid target (here: a copy of the second).
        copy = ModelVersion(**{c: getattr(session.get(ModelVersion, second), c)
                               for c in ("model_name", "kind", "parent_id", "method", "config", "metrics",
                                         "sha256", "artifact_path", "excluded_sample_ids")})
        session.add(copy)
        session.flush()
        copy_id = copy.id
    in_transaction(engine, deployments.rollback, seed.model, copy_id, actor="key:admin")
    with transaction(engine) as session:
        assert session.get(Model, seed.model).deployed_version_id == copy_id


def test_retention_deletes_files_that_still_carry_forgotten_samples(engine, settings, seed, parent_ta, tmp_path):
    original_file = tmp_path / "original.pt"
    original_file.write_bytes(b"weights that remember alice")
    with transaction(engine) as session:
        session.get(ModelVersion, seed.version_id).artifact_path = str(original_file)
    file_request(engine, seed, "alice")
    finish_run(engine, settings, claim_batch(engine, settings, seed.model), ta=parent_ta)
    assert prune_artifacts(engine, settings, seed.model, actor="test") == []  # within the retention time
    assert original_file.exists()
    immediate = settings.model_copy(update={"artifact_retention_hours": 0})
    assert prune_artifacts(engine, immediate, seed.model, actor="test") == [seed.version_id]
    assert not original_file.exists()
    with transaction(engine) as session:
        assert session.get(ModelVersion, seed.version_id).artifact_deleted_at is not None


def test_different_models_run_at_the_same_time(engine, settings, seed):
    with transaction(engine) as session:
        original = session.get(ModelVersion, seed.version_id)
        session.add(Model(name="digits-cnn-8bit", dataset="digits", spec={"architecture": "test"}))
        session.flush()
        other = ModelVersion(model_name="digits-cnn-8bit", kind=original.kind, method="qat", config={}, metrics={},
                             sha256="2" * 64, artifact_path="/nonexistent/other.pt", excluded_sample_ids=[])
        session.add(other)
        session.flush()
        session.get(Model, "digits-cnn-8bit").deployed_version_id = other.id
        for model_name, subject in ((seed.model, "alice"), ("digits-cnn-8bit", "bob")):
            file_forget_request(session, subject_id=subject, sample_ids=None, model_name=model_name,
                                deadline_days=30, actor="test")
    first = claim_batch(engine, settings, seed.model)
    second = claim_batch(engine, settings, "digits-cnn-8bit")
    assert first is not None and second is not None and first.batch_id != second.batch_id
    with transaction(engine) as session:
        running = session.scalars(select(Batch.model_name).where(Batch.status == BatchStatus.running)).all()
        assert sorted(running) == sorted([seed.model, "digits-cnn-8bit"])


def test_a_model_runs_the_method_its_settings_name(settings, engine, seed):
    with transaction(engine) as session:
        model = session.get(Model, seed.model)
        model.unlearn_config = {"method": "ft", "epochs": 2}
        # The service-wide settings the method has, then the model's own.
        assert unlearn_config(settings, model) == ("ft", FTConfig(
            epochs=2, lr=settings.unlearn_lr, momentum=settings.unlearn_momentum,
            weight_decay=settings.unlearn_weight_decay, batch_size=settings.unlearn_batch_size))
        model.unlearn_config = None
        everywhere = settings.model_copy(update={"unlearn_method": "oeu"})
        assert unlearn_config(everywhere, model)[0] == "oeu"
        # A setting the method does not have fails the run, saying so.
        model.unlearn_config = {"method": "ft", "similar_labels": False}
        with pytest.raises(TypeError, match="similar_labels"):
            unlearn_config(settings, model)


def test_the_service_names_only_methods_the_engine_has():
    assert set(typing.get_args(UnlearnMethod)) <= set(UNLEARNING_METHODS) - {"retrain"}
    assert set(QMUL_METHODS) <= set(typing.get_args(UnlearnMethod))
