"""Erasing every copy the service holds, with real runs: two models bootstrapped on one image-folder
data set (random 8x8 images, so each sample's bytes are unique), a subject's request forgotten by
both, then the erasure: frozen evidence, tombstones, caches rewritten, old artifacts deleted, the
subject kept only under its pseudonym, the data owner told by a signed webhook and its
acknowledgement recorded; and the files of the data directory, the model store and the cache
searched for the samples' bytes (and SQLite's files for the subject id). About 10 s per database
on one CPU thread.
"""

import json
import logging
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import SecretStr
from sqlalchemy import inspect, select, text

from service.audit.standing import erased_note
from service.core.db import drop_deleted_content, get_engine, make_engine, transaction
from service.core.models import ForgetRequest, ModelVersion, Sample, Subject
from service.core.pseudonyms import pseudonym
from service.requests.intake import file_forget_request
from service.webhooks.delivery import deliver_due
from tests.webhook_receiver import SECRET, running_receiver
from workers import runtime
from workers.batches.claims import claim_batch
from workers.batches.run import run_batch
from workers.bootstrap import bootstrap, default_spec
from workers.erasure import erase_due_requests
from workers.evaluation.deployment import evaluate_on_deployment_splits

ERASED_SUBJECT, SCOPED_SUBJECT = "subject-0001", "subject-0002"


@pytest.fixture
def owner_data() -> Path:
    """The data owner's copy: 10 classes of random grayscale 8x8 PNGs, 12 training and 3 test images
    each, under a short path (a data set's name, "imagefolder:<path>", has at most 64 characters)."""
    rng = np.random.default_rng(7)
    root = Path(tempfile.mkdtemp(prefix="qf-"))
    for split, count in (("train", 12), ("test", 3)):
        for label in range(10):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
                pixels[:, label % 8] = 255  # something to learn
                Image.fromarray(pixels, mode="L").save(folder / f"{i:03d}.png")
    yield root
    shutil.rmtree(root)


@pytest.fixture
def owner():
    """The data owner's webhook endpoint."""
    with running_receiver() as endpoint:
        yield endpoint


def files_containing(needles: list[bytes], *folders: Path) -> set[str]:
    found = set()
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                content = path.read_bytes()
                found |= {str(path) for needle in needles if needle in content}
    return found


def database_text(engine) -> str:
    """Every row of every table, as PostgreSQL prints it."""
    with engine.connect() as connection:
        tables = inspect(connection).get_table_names()
        return "\n".join(str(row) for table in tables
                         for row in connection.execute(text(f'SELECT t::text FROM "{table}" t')))


@pytest.mark.parametrize("database_url", ["postgresql", "sqlite"], indirect=True)
def test_erasure_leaves_no_copy_and_no_name(settings, owner_data, owner, tmp_path, monkeypatch, caplog, client,
                                            one_torch_thread):
    caplog.set_level(logging.INFO)
    cache = tmp_path / "cache"
    monkeypatch.setenv("QFORGET_CACHE_DIR", str(cache))
    settings = settings.model_copy(update={"unlearn_epochs": 1, "quality_gate_max_ta_drop": 100,
                                           "erasure_window_hours": 0, "webhook_url": owner.url,
                                           "webhook_secret": SecretStr(SECRET)})
    spec = replace(default_spec(epochs=1), dataset=f"imagefolder:{owner_data}")
    originals = {name: bootstrap(settings, name, spec, progress=False) for name in ("a", "b")}
    engine = get_engine(settings, "tests")
    with transaction(engine) as session:
        def samples_of(subject):
            return session.execute(select(Sample.id, Sample.dataset_index).where(Sample.subject_id == subject)
                                   .order_by(Sample.id)).all()
        erased_samples, scoped_samples = samples_of(ERASED_SUBJECT), samples_of(SCOPED_SUBJECT)
        everywhere = file_forget_request(session, subject_id=ERASED_SUBJECT, sample_ids=None, model_name=None,
                                         deadline_days=30, actor="test").request.id
        only_a = file_forget_request(session, subject_id=SCOPED_SUBJECT, sample_ids=None, model_name="a",
                                     deadline_days=30, actor="test").request.id

    data = runtime.load_data(spec, [])
    with np.load(data.train.cache_file) as stored:
        cached_pixels = stored["train_x"]

    def needles(samples):
        # The decoded pixels as cached (uint8) and as the workers hold them (normalised float32).
        return [raw for _, index in samples for raw in (cached_pixels[data.train.cache_rows[index]].tobytes(),
                                                          data.train.x[index].numpy().tobytes())]

    searched = (settings.data_dir, Path(settings.model_store), cache)
    # The search finds what is there: before the erasure, the cache holds every sample.
    assert files_containing(needles(erased_samples), *searched) == {str(data.train.cache_file)}

    deployed = {name: run_batch(engine, settings, claim_batch(engine, settings, name)) for name in ("a", "b")}
    with transaction(engine) as session:
        assert session.get(ForgetRequest, everywhere).status.value == "completed"
    # Within the window nothing is erased.
    assert erase_due_requests(engine, settings.model_copy(update={"erasure_window_hours": 1})) == []

    assert sorted(erase_due_requests(engine, settings)) == sorted([everywhere, only_a])
    assert erase_due_requests(engine, settings) == []  # once

    with transaction(engine) as session:
        request = session.get(ForgetRequest, everywhere)
        assert request.erased_at is not None
        assert all(part.frozen_evidence["after"]["sample_count"] == len(erased_samples) for part in request.parts)
        # The subject lives on under its pseudonym only.
        hashed = pseudonym(settings.audit_secret, "subject", ERASED_SUBJECT)
        assert request.subject_id == hashed and session.get(Subject, ERASED_SUBJECT) is None
        assert session.get(Subject, hashed).erased_at is not None
        # The request scoped to a leaves b's copies alone: those samples are not erased.
        assert session.get(ForgetRequest, only_a).erased_at is not None
        assert session.get(Subject, SCOPED_SUBJECT).erased_at is None
        assert not session.scalar(select(Sample.erased_at).where(Sample.id == scoped_samples[0].id))
        # The originals carried the erased samples and are deployed by no model: their files are gone.
        for name, version_id in originals.items():
            version = session.get(ModelVersion, version_id)
            assert version.artifact_deleted_at is not None and not Path(version.artifact_path).exists()
            assert Path(session.get(ModelVersion, deployed[name]).artifact_path).exists()

    # The owner is told which of its records to delete, and acknowledges.
    assert all(attempt.delivered for attempt in deliver_due(engine))
    [told] = [json.loads(r.body)["data"] for r in owner.received if json.loads(r.body)["type"] == "request.erased"]
    assert told["subject_id"] == ERASED_SUBJECT and told["request_id"] == everywhere
    assert [s["dataset_index"] for s in told["samples"]] == sorted(index for _, index in erased_samples)
    with transaction(engine) as session:
        assert session.get(ForgetRequest, everywhere).erasure_acknowledged_at is not None

    # SQLite's files are in the data directory: they are searched for the subject id too.
    assert files_containing(needles(erased_samples) + [ERASED_SUBJECT.encode()], *searched) == set()
    assert files_containing(needles(scoped_samples), *searched) == {str(data.train.cache_file)}
    if engine.dialect.name == "postgresql":
        assert ERASED_SUBJECT not in database_text(engine)
    assert not [record for record in caplog.records if ERASED_SUBJECT in record.getMessage()]

    # The evidence is the frozen one; the subject is found by its id, as erased.
    evidence = client.get(f"/forget-requests/{everywhere}/evidence", params={"model": "b"}).json()
    assert evidence["frozen_at"] is not None and evidence["after"]["sample_count"] == len(erased_samples)
    subject = client.get(f"/subjects/{ERASED_SUBJECT}").json()
    assert subject["id"] == hashed and subject["erased_at"] is not None and subject["held_sample_count"] == 0
    assert ERASED_SUBJECT not in str(client.get("/metrics").text)

    # Later audits go on without the erased samples (a worker that loads the data afresh blanks them).
    runtime._loaded_data.clear()
    reloaded = runtime.load_data(spec, [index for _, index in erased_samples])
    assert not reloaded.train.x[[index for _, index in erased_samples]].any()
    metrics = evaluate_on_deployment_splits(engine, settings, "a", deployed["a"])
    assert set(metrics) >= {"FA", "RA", "TA", "MIA"}
    with transaction(engine) as session:
        note = erased_note(session, session.get(ModelVersion, deployed["a"]))
    assert note.startswith(f"; {len(erased_samples)} of these samples are erased")


def test_sqlite_files_keep_nothing_deleted_after_the_compaction(tmp_path):
    """What a transaction deleted stays in SQLite's files (free pages, index inner pages, the
    write-ahead log) even with secure_delete, until drop_deleted_content rebuilds them."""
    engine = make_engine(f"sqlite:///{tmp_path / 'q.db'}", "test")
    marker = "subject-to-forget"
    with transaction(engine) as session:
        session.execute(text("CREATE TABLE owners (id INTEGER PRIMARY KEY, name TEXT)"))
        session.execute(text("CREATE INDEX ix_owners_name ON owners (name)"))
        session.execute(text("INSERT INTO owners (name) VALUES (:name)"),
                        [{"name": f"{marker if i % 97 == 0 else 'someone'}-{i:05d}"} for i in range(20000)])
    with transaction(engine) as session:
        session.execute(text("DELETE FROM owners WHERE name LIKE :marker"), {"marker": f"{marker}%"})

    def files_naming_it():
        return {path.name for path in tmp_path.iterdir() if marker.encode() in path.read_bytes()}

    assert files_naming_it()
    drop_deleted_content(engine)
    assert files_naming_it() == set()
    with transaction(engine) as session:
        assert session.scalar(text("SELECT COUNT(*) FROM owners")) == 20000 - 207
    engine.dispose()
