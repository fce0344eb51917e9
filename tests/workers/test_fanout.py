"""One subject's erasure across every model that learned the subject's data, with real runs: two
digits models bootstrapped on one data set, a request filed without a model, Q-MUL run for each;
then a third model bootstrapped after the erasure. PostgreSQL only; about 30 s on one CPU thread.
"""

import pytest
from sqlalchemy import select

from service.core.db import get_engine, transaction
from service.core.models import (
    AuditEntry,
    Dataset,
    ForgetRequest,
    ForgottenSample,
    Model,
    ModelVersion,
    RequestStatus,
    Sample,
)
from service.deployments.deploy import AdminRefusal, rollback
from service.requests.holdings import holders
from service.requests.intake import file_forget_request
from service.requests.problems import RequestValidationProblem
from workers.batches.claims import claim_batch
from workers.batches.run import run_batch
from workers.bootstrap import bootstrap, default_spec
from workers.references.training import train_reference

SUBJECT = "subject-0001"


def request_state(engine, request_id):
    with transaction(engine) as session:
        request = session.get(ForgetRequest, request_id)
        return request.status, {part.model_name: part.status for part in request.parts}


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_subject_is_forgotten_by_every_model_that_learned_it(settings, one_torch_thread):
    settings = settings.model_copy(update={"unlearn_epochs": 1, "quality_gate_max_ta_drop": 100})
    originals = {name: bootstrap(settings, name, default_spec(epochs=1), progress=False) for name in ("a", "b")}
    engine = get_engine(settings, "tests")
    with transaction(engine) as session:
        subject_samples = session.scalars(select(Sample.id).where(Sample.subject_id == SUBJECT)).all()
        assert set(holders(session, subject_samples)) == {"a", "b"}
        filed = file_forget_request(session, subject_id=SUBJECT, sample_ids=None, model_name=None,
                                    deadline_days=30, actor="test")
        request_id = filed.request.id
    assert sorted(filed.sample_ids) == sorted(subject_samples) and len(subject_samples) == 10
    assert request_state(engine, request_id) == (RequestStatus.pending, {"a": RequestStatus.pending,
                                                                         "b": RequestStatus.pending})

    version_a = run_batch(engine, settings, claim_batch(engine, settings, "a"))
    # One of two holders has forgotten: the request is not completed.
    assert request_state(engine, request_id) == (RequestStatus.batched, {"a": RequestStatus.completed,
                                                                         "b": RequestStatus.pending})
    with transaction(engine) as session:
        assert set(holders(session, subject_samples)) == {"b"}
        # Forgotten for a, still held by b: a request scoped to b is accepted, one scoped to a refused.
        with pytest.raises(RequestValidationProblem, match="no samples that model 'a' still holds"):
            file_forget_request(session, subject_id=SUBJECT, sample_ids=None, model_name="a",
                                deadline_days=30, actor="test")
    with transaction(engine) as session:  # b runs another of the engine's methods, as an admin may set
        session.get(Model, "b").unlearn_config = {"method": "ft"}
    version_b = run_batch(engine, settings, claim_batch(engine, settings, "b"))
    status, parts = request_state(engine, request_id)
    assert (status, parts) == (RequestStatus.completed, {"a": RequestStatus.completed, "b": RequestStatus.completed})

    with transaction(engine) as session:
        for name, version_id in (("a", version_a), ("b", version_b)):
            version = session.get(ModelVersion, version_id)
            assert version.method == {"a": "qmul", "b": "ft"}[name]
            # The integer export an edge device runs forgot as much as the model that was evaluated.
            export = version.metrics["integer_export"]
            assert export["within_tolerance"] and abs(export["FA"] - export["fake_quantized_FA"]) <= 1.0
            assert export["fake_quantized_FA"] == version.metrics["FA"]
            # The lineage names exactly what this model forgot: no sample another model forgot.
            assert sorted(version.excluded_sample_ids) == sorted(subject_samples)
            forgotten = session.scalars(select(ForgottenSample.sample_id).where(ForgottenSample.model_name == name))
            assert sorted(forgotten) == sorted(subject_samples)
        assert holders(session, subject_samples) == {}
        request = session.get(ForgetRequest, request_id)
        assert {part.model_name: part.completed_version_id for part in request.parts} == {"a": version_a,
                                                                                          "b": version_b}
        # Rolling a back to its original would bring the subject back.
        with pytest.raises(AdminRefusal, match="bring them back"):
            rollback(session, "a", originals["a"], "test")

    # A model bootstrapped after the erasure never learns the subject's samples.
    late_original = bootstrap(settings, "c", default_spec(epochs=1), progress=False)
    with transaction(engine) as session:
        original = session.get(ModelVersion, late_original)
        assert sorted(original.excluded_sample_ids) == sorted(subject_samples)
        never_learned = session.execute(select(ForgottenSample.sample_id, ForgottenSample.version_id)
                                        .where(ForgottenSample.model_name == "c")).all()
        assert sorted(never_learned) == sorted((sample_id, late_original) for sample_id in subject_samples)
        assert holders(session, subject_samples) == {}
        with pytest.raises(RequestValidationProblem, match="no samples that any model still holds"):
            file_forget_request(session, subject_id=SUBJECT, sample_ids=None, model_name=None,
                                deadline_days=30, actor="test")
    # Its reference is trained without them too, and excludes what its deployment excludes.
    reference = train_reference(engine, settings, "c")
    with transaction(engine) as session:
        assert sorted(session.get(ModelVersion, reference).excluded_sample_ids) == sorted(subject_samples)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_sample_the_data_set_lacks_does_not_stop_erasures(settings, one_torch_thread):
    """A registration beyond the data set, written before registrations were checked (straight into
    the table here), and a recorded size larger than the data the worker loads: runs go on."""
    settings = settings.model_copy(update={"unlearn_epochs": 1, "quality_gate_max_ta_drop": 100})
    bootstrap(settings, "a", default_spec(epochs=1), progress=False)
    engine = get_engine(settings, "tests")
    with transaction(engine) as session:
        train_size = session.get(Dataset, "digits").train_size
        session.add(Sample(dataset="digits", dataset_index=train_size + 3563, subject_id="subject-0003"))
        session.get(Dataset, "digits").train_size = train_size + 3564  # the data shrank since
        file_forget_request(session, subject_id="subject-0002", sample_ids=None, model_name=None,
                            deadline_days=30, actor="test")
    version_id = run_batch(engine, settings, claim_batch(engine, settings, "a"))
    assert version_id is not None
    with transaction(engine) as session:
        skipped = session.scalars(select(AuditEntry.details).where(AuditEntry.action == "batch.samples_skipped")).all()
        assert skipped == [{"unreadable_retain_samples": 1}]
        assert session.scalars(select(ForgetRequest.status)).all() == [RequestStatus.completed]
