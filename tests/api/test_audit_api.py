"""GET /audit: the deployed version's newest evaluation against the retrain reference."""

from datetime import datetime, timedelta

from service.core.db import transaction
from service.core.models import Evaluation, Model, ModelVersion, VersionKind, utcnow

METRICS = {"FA": 97.5, "RA": 99.0, "TA": 96.0, "MIA": 20.0}
REFERENCE = {"FA": 95.0, "RA": 99.5, "TA": 96.5, "MIA": 15.0}
GAPS = {"FA": 2.5, "RA": 0.5, "TA": 0.5, "MIA": 5.0, "AG": 2.125}


def add_version(engine, model: str, kind: VersionKind, deploy: bool = False) -> int:
    with transaction(engine) as session:
        version = ModelVersion(
            model_name=model, kind=kind, method="test", config={}, sha256="1" * 64, artifact_path="/nonexistent"
        )
        session.add(version)
        session.flush()
        if deploy:
            session.get(Model, model).deployed_version_id = version.id
        return version.id


def add_evaluation(engine, version_id: int, reference_id: int, created_at: datetime | None = None, **metrics) -> int:
    with transaction(engine) as session:
        evaluation = Evaluation(
            version_id=version_id, reference_id=reference_id, metrics={**METRICS, **metrics},
            reference_metrics=REFERENCE, gaps=GAPS, forget_count=12, retain_count=1425, test_count=360,
            created_at=created_at or utcnow(),
        )
        session.add(evaluation)
        session.flush()
        return evaluation.id


def test_an_unknown_model_is_404(client, seed):
    response = client.get("/audit", params={"model": "nope"})
    assert response.status_code == 404
    assert response.json() == {"detail": "model 'nope' not found"}


def test_a_model_name_that_cannot_be_one_is_422(client, seed):
    response = client.get("/audit", params={"model": "digits\x00"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "model"]


def test_missing_when_nothing_was_evaluated(client, seed):
    body = client.get("/audit").json()  # the default model
    assert body["model"] == seed.model
    assert body["deployed_version_id"] == seed.version_id
    assert body["status"] == "missing"
    assert body["evaluation"] is None


def test_current_gives_the_newest_evaluation_of_the_deployed_version(client, seed, engine):
    reference = add_version(engine, seed.model, VersionKind.reference)
    add_evaluation(engine, seed.version_id, reference, created_at=utcnow() - timedelta(hours=1), FA=50.0)
    newest = add_evaluation(engine, seed.version_id, reference)
    body = client.get("/audit", params={"model": seed.model}).json()
    assert body["status"] == "current"
    evaluation = body["evaluation"]
    assert evaluation["id"] == newest
    assert (evaluation["version_id"], evaluation["reference_id"]) == (seed.version_id, reference)
    # Recorded without MIA's spread (as evaluations made before MIA was averaged over draws): MIA_sd null.
    assert evaluation["metrics"] == {**METRICS, "MIA_sd": None}
    assert evaluation["reference_metrics"] == {**REFERENCE, "MIA_sd": None}
    assert evaluation["gaps"] == GAPS
    assert (evaluation["forget_count"], evaluation["retain_count"], evaluation["test_count"]) == (12, 1425, 360)
    assert datetime.fromisoformat(evaluation["computed_at"]).utcoffset() == timedelta(0)


def test_stale_when_only_an_earlier_version_was_evaluated(client, seed, engine):
    reference = add_version(engine, seed.model, VersionKind.reference)
    earlier = add_evaluation(engine, seed.version_id, reference)
    deployed = add_version(engine, seed.model, VersionKind.unlearned, deploy=True)
    body = client.get("/audit").json()
    assert body["status"] == "stale"
    assert body["deployed_version_id"] == deployed
    assert (body["evaluation"]["id"], body["evaluation"]["version_id"]) == (earlier, seed.version_id)
    assert str(deployed) in body["message"] and str(seed.version_id) in body["message"]

    # Once the deployed version is evaluated it wins, even over a newer evaluation of the old one.
    current = add_evaluation(engine, deployed, reference, created_at=utcnow() - timedelta(days=1))
    add_evaluation(engine, seed.version_id, reference)
    body = client.get("/audit").json()
    assert (body["status"], body["evaluation"]["id"]) == ("current", current)


def test_evaluations_of_another_model_do_not_count(client, seed, engine):
    with transaction(engine) as session:
        session.add(Model(name="other", dataset="digits", spec={}))
    other_version = add_version(engine, "other", VersionKind.original, deploy=True)
    add_evaluation(engine, other_version, other_version)
    assert client.get("/audit").json()["status"] == "missing"
