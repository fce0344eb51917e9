"""Approximate retrain references (QFORGET_APPROXIMATE_REFERENCE_FRACTION, docs/audit.md): off by
default; when on, a reference request first records one trained on a coreset of the retain set, for
an interim audit labelled approximate everywhere (API, evidence, report, dashboard figures), and the
full reference of the same state then supersedes it.

The audit's side runs on placeholder versions (both databases); one real run on the digits (about
20 s on one CPU thread, PostgreSQL) drives the worker's task end to end.
"""

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from service.audit.comparison import compare_with_references
from service.audit.standing import deployment_audit
from service.core.db import get_engine, transaction
from service.core.models import AuditEntry, Evaluation, Model, ModelVersion, ReferenceRequest, VersionKind, utcnow
from service.core.settings import Settings
from service.references.schedule import reference_state, request_reference
from service.requests.intake import file_forget_request
from workers.batches.claims import claim_batch
from workers.batches.run import _record_result, run_batch
from workers.engine import QMulConfig
from workers.evaluation.deployment import measure_approximation

METRICS = {"FA": 97.5, "RA": 99.0, "TA": 96.0, "MIA": 20.0}
GAPS = {"FA": 2.5, "RA": 0.5, "TA": 0.5, "MIA": 5.0, "AG": 2.125}
CORESET = {"fraction": 0.3, "selector": "random", "samples": 425, "retain_samples": 1415, "seconds": 1.5}


# Settings: off by default, bad values named by their variable.

def test_off_by_default():
    settings = Settings(_env_file=None)
    assert (settings.approximate_reference_fraction, settings.approximate_reference_selector) == (None, "random")


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.2, float("nan")])
def test_a_fraction_outside_0_1_is_refused_naming_the_setting(monkeypatch, fraction):
    monkeypatch.setenv("QFORGET_APPROXIMATE_REFERENCE_FRACTION", str(fraction))
    with pytest.raises(ValidationError, match="QFORGET_APPROXIMATE_REFERENCE_FRACTION: a fraction of the retain set"):
        Settings(_env_file=None)


def test_an_unknown_selector_is_refused_naming_the_setting(monkeypatch):
    monkeypatch.setenv("QFORGET_APPROXIMATE_REFERENCE_FRACTION", "0.3")
    monkeypatch.setenv("QFORGET_APPROXIMATE_REFERENCE_SELECTOR", "best")
    with pytest.raises(ValidationError, match="QFORGET_APPROXIMATE_REFERENCE_SELECTOR: one of random, res, jscds"):
        Settings(_env_file=None)
    monkeypatch.setenv("QFORGET_APPROXIMATE_REFERENCE_SELECTOR", "jscds")
    assert Settings(_env_file=None).approximate_reference_selector == "jscds"


# The audit's side, on placeholder versions.

def deploy_batch(engine, settings, seed, subject: str) -> int:
    with transaction(engine) as session:
        file_forget_request(session, subject_id=subject, sample_ids=None, model_name=seed.model,
                            deadline_days=30, actor="test")
    claimed = claim_batch(engine, settings, seed.model)
    return _record_result(engine, settings, claimed, sorted(seed.samples[subject]), "/nonexistent/v.pt", "1" * 64,
                          ("qmul", QMulConfig(epochs=1)), {"FA": 10.0, "RA": 99.0, "TA": 95.0, "MIA": 50.0},
                          history=[])


def add_reference(engine, seed, excluded, approximate: bool) -> int:
    with transaction(engine) as session:
        version = ModelVersion(model_name=seed.model, kind=VersionKind.reference, method="retrain", config={},
                               metrics={"coreset": CORESET} if approximate else {}, sha256="2" * 64,
                               artifact_path="/nonexistent/r.pt", excluded_sample_ids=sorted(excluded),
                               approximate=approximate)
        session.add(version)
        session.flush()
        return version.id


def add_evaluation(engine, version_id: int, reference_id: int, reference_metrics=METRICS, AG=2.125) -> int:
    with transaction(engine) as session:
        evaluation = Evaluation(version_id=version_id, reference_id=reference_id, metrics=METRICS,
                                reference_metrics=reference_metrics, gaps={**GAPS, "AG": AG}, forget_count=6,
                                retain_count=1425,
                                test_count=360, created_at=utcnow())
        session.add(evaluation)
        session.flush()
        return evaluation.id


@pytest.fixture
def parent_ta(engine, seed):
    with transaction(engine) as session:
        session.get(ModelVersion, seed.version_id).metrics = {"TA": 95.0}


def test_an_approximate_reference_is_an_interim_audit_until_the_full_one_supersedes_it(
        engine, settings, seed, parent_ta, client, bearer):
    deployed = deploy_batch(engine, settings, seed, "alice")
    approximate = add_reference(engine, seed, seed.samples["alice"], approximate=True)
    interim = add_evaluation(engine, deployed, approximate)

    auditor = bearer("auditor")
    body = client.get("/audit", headers=auditor).json()
    assert (body["status"], body["approximate"]) == ("interim", True)
    assert body["message"].startswith("interim audit against an approximate reference")
    assert "coreset of 425 samples" in body["message"] and "off by several points of AG" in body["message"]
    assert (body["evaluation"]["id"], body["evaluation"]["approximate"]) == (interim, True)
    assert (body["reference"]["status"], body["reference"]["approximate"]) == ("matching", True)
    version = client.get(f"/audit/versions/{deployed}", headers=auditor).json()
    assert (version["status"], version["evaluation"]["approximate"]) == ("interim", True)
    listed = client.get(f"/models/{approximate}", headers=auditor).json()
    assert (listed["approximate"], listed["metrics"]["coreset"]) == (True, CORESET)
    page = client.get("/audit/report", headers=auditor).text
    assert 'data-status="interim"' in page and "Status: interim, against an approximate reference." in page
    assert 'id="approximate-note"' in page and "approximate</span> (coreset of 425 samples, random)" in page
    assert f"v{deployed} approx." in page  # the gaps plot marks the interim evaluation
    [shown] = client.get("/dashboard/data", headers=auditor).json()["deployments"]
    assert (shown["evaluation"]["id"], shown["evaluation"]["approximate"]) == (interim, True)  # the page's label
    assert "approximate" in client.get("/dashboard/assets/dashboard.js").text
    assert 'qforget_evaluation_approximate{model="digits-cnn-4bit"} 1.0' in client.get("/metrics").text
    with transaction(engine) as session:
        # The schedule counts full references only: the state is still due one (its request stays open).
        assert reference_state(session, session.get(Model, seed.model)).newest_reference_excluded is None

    # The full reference of the same state: the audit uses it, never the interim evaluation as current.
    full = add_reference(engine, seed, seed.samples["alice"], approximate=False)
    with transaction(engine) as session:
        comparison = compare_with_references(session, session.get(ModelVersion, deployed))
        assert (comparison.status, comparison.reference.id, comparison.approximate) == ("matching", full, False)
        audit = deployment_audit(session, session.get(Model, seed.model))
        assert (audit.status, audit.evaluation.id, audit.approximate) == ("stale", interim, True)
        assert "not been evaluated against the full reference yet" in audit.message
    evaluation = add_evaluation(engine, deployed, full, reference_metrics={**METRICS, "FA": 93.5}, AG=1.125)
    # Its gap to the full reference, measured from the two evaluations (the task does this after the full one).
    measured = measure_approximation(engine, evaluation)
    assert (measured["approximate_reference_id"], measured["reference_id"], measured["coreset"]) == (
        approximate, full, CORESET)
    assert measured["approximate_reference_gaps"] == {"FA": 4.0, "RA": 0.0, "TA": 0.0, "MIA": 0.0, "AG": 1.0}
    assert measured["interim_AG_error"] == pytest.approx(1.0)
    with transaction(engine) as session:
        entry = session.scalars(select(AuditEntry).where(
            AuditEntry.action == "reference.approximation_measured")).one()
        assert entry.object_id == str(approximate) and entry.details["interim_evaluation_id"] == interim
    body = client.get("/audit", headers=auditor).json()
    assert (body["status"], body["approximate"], body["evaluation"]["id"]) == ("current", False, evaluation)
    assert body["reference"] == {**body["reference"], "reference_id": full, "approximate": False}
    assert "approximate" not in body["message"]
    page = client.get("/audit/report", headers=auditor).text
    assert 'data-status="current"' in page and 'id="approximate-note"' not in page
    assert page.count('<tr data-approximate="true">') == 1 and page.count('<tr data-approximate="false">') == 1


def test_the_full_reference_wins_whichever_is_newer(engine, settings, seed, parent_ta):
    deployed = deploy_batch(engine, settings, seed, "alice")
    full = add_reference(engine, seed, seed.samples["alice"], approximate=False)
    add_evaluation(engine, deployed, add_reference(engine, seed, seed.samples["alice"], approximate=True))
    with transaction(engine) as session:
        audit = deployment_audit(session, session.get(Model, seed.model))
        assert (audit.status, audit.reference.reference_id) == ("stale", full)


# The worker's task, on a real run.

@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_the_task_records_an_approximate_reference_first_then_the_full_one(settings, one_torch_thread, monkeypatch):
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.core.api_keys import create_api_key
    from workers import tasks
    from workers.bootstrap import bootstrap, default_spec
    from workers.references.training import train_approximate_reference

    settings = settings.model_copy(update={"unlearn_epochs": 2, "quality_gate_max_ta_drop": 100,
                                           "approximate_reference_fraction": 0.2})
    bootstrap(settings, settings.default_model, default_spec(epochs=3), progress=False)
    engine = get_engine(settings, "tests")
    with transaction(engine) as session:
        request_id = file_forget_request(session, subject_id="subject-0001", sample_ids=None,
                                         model_name=settings.default_model, deadline_days=30, actor="test").request.id
        _, key = create_api_key(session, role="auditor", name="tests", actor="tests")
    deployed = run_batch(engine, settings, claim_batch(engine, settings, settings.default_model))
    with transaction(engine) as session:
        reference_request = request_reference(session, session.get(Model, settings.default_model), "test", "test").id
    client = TestClient(create_app(settings), headers={"Authorization": f"Bearer {key}"})

    # What the audit shows between the two: the interim audit (the task's first step, on its own here).
    assert tasks.interim_audit(engine, settings, settings.default_model, reference_request) is not None
    with transaction(engine) as session:
        [approximate] = session.scalars(select(ModelVersion).where(ModelVersion.kind == VersionKind.reference)).all()
        assert approximate.approximate and approximate.excluded_sample_ids == session.get(
            ModelVersion, deployed).excluded_sample_ids
        coreset = approximate.metrics["coreset"]
        assert (coreset["fraction"], coreset["selector"]) == (0.2, "random")
        assert coreset["samples"] == pytest.approx(0.2 * coreset["retain_samples"], abs=10)  # per class, rounded
        assert session.get(ReferenceRequest, reference_request).finished_at is None  # the full one still comes
        entry = session.scalars(select(AuditEntry).where(AuditEntry.action == "reference.approximated")).one()
        assert entry.details["coreset"] == coreset
    audit = client.get("/audit").json()
    assert (audit["status"], audit["approximate"], audit["evaluation"]["reference_id"]) == (
        "interim", True, approximate.id)
    evidence = client.get(f"/forget-requests/{request_id}/evidence").json()
    assert (evidence["status"], evidence["approximate"]) == ("interim", True)
    assert evidence["reference"]["version_id"] == approximate.id and "approximate reference" in evidence["message"]
    # A redelivery of the request trains no second approximate reference of the same state.
    assert train_approximate_reference(engine, settings, settings.default_model, reference_request) is None

    # The task (a redelivery, say): straight to the full reference, which closes the request and supersedes it.
    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    assert tasks.train_reference(settings.default_model, reference_request) is not None
    with transaction(engine) as session:
        references = session.scalars(select(ModelVersion).where(ModelVersion.kind == VersionKind.reference)
                                     .order_by(ModelVersion.id)).all()
        assert [reference.approximate for reference in references] == [True, False]
        full = references[1]
        assert session.get(ReferenceRequest, reference_request).reference_version_id == full.id
        measured = session.scalars(select(AuditEntry).where(
            AuditEntry.action == "reference.approximation_measured")).one().details
        assert (measured["approximate_reference_id"], measured["reference_id"]) == (approximate.id, full.id)
        assert 0 <= measured["approximate_reference_gaps"]["AG"] <= 100
    audit = client.get("/audit").json()
    assert (audit["status"], audit["approximate"], audit["evaluation"]["reference_id"]) == ("current", False, full.id)
    evidence = client.get(f"/forget-requests/{request_id}/evidence").json()
    assert (evidence["status"], evidence["approximate"], evidence["reference"]["version_id"]) == (
        "complete", False, full.id)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_off_the_task_records_the_full_reference_only(settings, one_torch_thread, monkeypatch):
    from workers import tasks
    from workers.bootstrap import bootstrap, default_spec

    bootstrap(settings, settings.default_model, default_spec(epochs=2), progress=False)
    engine = get_engine(settings, "tests")
    with transaction(engine) as session:
        reference_request = request_reference(session, session.get(Model, settings.default_model), "test", "test").id
    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    tasks.train_reference(settings.default_model, reference_request)
    with transaction(engine) as session:
        [reference] = session.scalars(select(ModelVersion).where(ModelVersion.kind == VersionKind.reference)).all()
        assert not reference.approximate and "coreset" not in reference.metrics
        assert session.get(ReferenceRequest, reference_request).reference_version_id == reference.id
