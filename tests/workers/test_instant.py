"""The instant stage of a semi-parametric model (workers/instant.py), on SQLite and PostgreSQL, with a
real SPM trained on the digits: the deployed datastore loses the request's samples, the parts and
the request show `instant` with the version, a crash before the commit loses nothing."""

from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import func, select

from service.core.audit_log import verify_chain
from service.core.db import transaction
from service.core.models import AuditEntry, ForgetRequest, Model, ModelVersion, RequestStatus, Sample, SampleScore
from service.deployments.deploy import AdminRefusal, rollback
from service.requests import lifecycle
from service.requests.instant import awaiting_instant_stage
from service.requests.intake import file_forget_request
from service.requests.problems import RequestConflict
from workers import engine as qf
from workers import instant
from workers.bootstrap import bootstrap, default_spec

MODEL = "spm-digits"
SUBJECT = "subject-0002"


@pytest.fixture
def spm_model(settings, engine, one_torch_thread) -> int:
    spec = replace(default_spec(epochs=2), spm={"embed_dim": 32, "k": 8})
    return bootstrap(settings, MODEL, spec, progress=False)


def file(engine, subject: str = SUBJECT) -> str:
    with transaction(engine) as session:
        return file_forget_request(session, subject_id=subject, sample_ids=None, model_name=MODEL,
                                   deadline_days=30, actor="test").request.id


def subject_indices(engine, subject: str = SUBJECT) -> list[int]:
    with transaction(engine) as session:
        return sorted(session.scalars(select(Sample.dataset_index).where(Sample.subject_id == subject)))


def deployed(engine) -> ModelVersion:
    with transaction(engine) as session:
        version = session.get(ModelVersion, session.get(Model, MODEL).deployed_version_id)
        session.expunge(version)
        return version


def test_the_datastore_loses_the_samples_and_the_request_shows_instant(settings, engine, spm_model):
    with transaction(engine) as session:
        assert session.get(Model, MODEL).semi_parametric
    original = deployed(engine)
    request_id = file(engine)
    with engine.connect() as connection:
        assert awaiting_instant_stage(connection) == [MODEL]

    version_id = instant.take_instant_effect(engine, settings, MODEL)

    version = deployed(engine)
    assert version.id == version_id and version.parent_id == original.id and version.sha256 != original.sha256
    assert version.method == instant.METHOD and version.batch_id is None
    assert version.excluded_sample_ids == original.excluded_sample_ids  # the encoder still holds them
    before, _ = qf.load_artifact(Path(original.artifact_path), original.sha256)
    after, _ = qf.load_artifact(Path(version.artifact_path), version.sha256)
    removed = subject_indices(engine)
    assert after.datastore_size() == before.datastore_size() - len(removed) == len(before.store_index) - 10
    assert set(after.store_index.tolist()) == set(before.store_index.tolist()) - set(removed)
    with transaction(engine) as session:
        request = session.get(ForgetRequest, request_id)
        [part] = request.parts
        assert request.status == part.status == RequestStatus.instant
        assert part.instant_version_id == version_id and part.instant_at is not None and part.batch_id is None
        assert request.completed_at is None
        actions = session.execute(select(AuditEntry.action, AuditEntry.details).where(
            AuditEntry.object_id.in_([request_id, str(version_id)]))).all()
        assert ("request.part_instant", {"model": MODEL, "version_id": version_id}) in actions
        assert any(action == "model.deployed" and details["stage"] == "instant" for action, details in actions)
        # Figures of both versions on the samples, for the evidence.
        for figured in (original.id, version_id):
            assert session.scalar(select(func.count()).select_from(SampleScore)
                                  .where(SampleScore.version_id == figured)) == len(removed)
        assert verify_chain(session).ok
        # The datastore no longer holds them: the client cannot take the request back.
        with pytest.raises(RequestConflict, match="datastore"):
            lifecycle.withdraw(session, request, "changed my mind", "test", request.received_at)

    # Nothing waits any more: a repeated wake-up does nothing.
    with engine.connect() as connection:
        assert awaiting_instant_stage(connection) == []
    assert instant.take_instant_effect(engine, settings, MODEL) is None
    assert deployed(engine).id == version_id


def test_a_crash_before_the_commit_loses_nothing(settings, engine, spm_model, monkeypatch):
    original = deployed(engine)
    request_id = file(engine)

    def crash(*args, **kwargs):
        raise RuntimeError("killed before the commit")

    monkeypatch.setattr(instant.lifecycle, "take_effect", crash)
    with pytest.raises(RuntimeError, match="killed"):
        instant.take_instant_effect(engine, settings, MODEL)
    assert deployed(engine).id == original.id
    with transaction(engine) as session:
        assert session.scalar(select(func.count()).select_from(ModelVersion)) == 1
        [part] = session.get(ForgetRequest, request_id).parts
        assert part.status == RequestStatus.pending and part.instant_version_id is None
    with engine.connect() as connection:
        assert awaiting_instant_stage(connection) == [MODEL]  # the scheduler wakes it again

    monkeypatch.undo()
    version_id = instant.take_instant_effect(engine, settings, MODEL)
    assert deployed(engine).id == version_id
    with transaction(engine) as session:
        [part] = session.get(ForgetRequest, request_id).parts
        assert part.status == RequestStatus.instant and part.instant_version_id == version_id


def test_a_parametric_model_has_no_instant_stage(settings, engine, one_torch_thread):
    bootstrap(settings, MODEL, default_spec(epochs=1), progress=False)
    file(engine)
    with engine.connect() as connection:
        assert awaiting_instant_stage(connection) == []
    assert instant.take_instant_effect(engine, settings, MODEL) is None


def test_a_rollback_past_the_instant_stage_is_refused(settings, engine, spm_model):
    original = deployed(engine)
    file(engine)
    version_id = instant.take_instant_effect(engine, settings, MODEL, evidence=False)
    with transaction(engine) as session:
        with pytest.raises(AdminRefusal, match="instant stage"):
            rollback(session, MODEL, original.id, "test")
        rollback(session, MODEL, version_id, "test")  # itself: no sample comes back
