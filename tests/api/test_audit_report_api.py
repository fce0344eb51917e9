"""The audit routes: POST /models/{model}/references, GET /audit/versions/{id}, the reference
state in GET /audit, GET /forget-requests/{id}/evidence and GET /audit/report.

Versions, references, evaluations and per-sample figures are inserted as the workers would write
them (the figures themselves are computed by a real run in tests/workers/test_audit_evidence.py).
"""

import re

import pytest
from sqlalchemy import func, select

from service.api.schemas import EvidencePublic
from service.audit.evidence import DIFFERENCE_THRESHOLD, request_evidence
from service.core.db import transaction
from service.core.models import (
    AuditEntry,
    Batch,
    BatchStatus,
    Evaluation,
    ForgetRequest,
    ForgetRequestPart,
    Model,
    ModelVersion,
    ReferenceRequest,
    RequestStatus,
    SampleScore,
    VersionKind,
    utcnow,
)
from service.requests.intake import file_forget_request

METRICS = {"FA": 97.5, "RA": 99.0, "TA": 96.0, "MIA": 20.0}
REFERENCE = {"FA": 95.0, "RA": 99.5, "TA": 96.5, "MIA": 15.0}
GAPS = {"FA": 2.5, "RA": 0.5, "TA": 0.5, "MIA": 5.0, "AG": 2.125}


def add_version(engine, model, kind, excluded=(), deploy=False) -> int:
    with transaction(engine) as session:
        version = ModelVersion(model_name=model, kind=kind, method="qmul" if kind == VersionKind.unlearned else "x",
                               config={"epochs": 3}, sha256="1" * 64, artifact_path="/nonexistent",
                               excluded_sample_ids=sorted(excluded))
        session.add(version)
        session.flush()
        if deploy:
            session.get(Model, model).deployed_version_id = version.id
        return version.id


def add_model(engine, name) -> int:
    """Another model on "digits", with a deployed original: it holds the seed's samples too."""
    with transaction(engine) as session:
        session.add(Model(name=name, dataset="digits", spec={}))
    return add_version(engine, name, VersionKind.original, deploy=True)


def add_evaluation(engine, version_id, reference_id, histograms=None) -> int:
    with transaction(engine) as session:
        evaluation = Evaluation(version_id=version_id, reference_id=reference_id, metrics=METRICS,
                                reference_metrics=REFERENCE, gaps=GAPS, forget_count=6, retain_count=9,
                                test_count=360, score_histograms=histograms)
        session.add(evaluation)
        session.flush()
        return evaluation.id


def counts(engine, *tables) -> list[int]:
    with engine.connect() as connection:
        return [connection.scalar(select(func.count()).select_from(table)) for table in tables]


# POST /models/{model}/references


def test_an_admin_queues_a_reference_once_per_deployment(client, engine, seed):
    response = client.post(f"/models/{seed.model}/references")
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["model"] == seed.model and body["created"] is True and body["queue"] == "gpu"
    assert (body["deployed_version_id"], body["excluded_sample_count"]) == (seed.version_id, 0)
    assert body["sent_at"] is None and body["reference_version_id"] is None
    assert body["requested_by"].startswith("key:")

    again = client.post(f"/models/{seed.model}/references").json()
    assert (again["id"], again["created"]) == (body["id"], False)
    with transaction(engine) as session:
        assert session.scalar(select(func.count()).select_from(ReferenceRequest)) == 1
        assert session.scalar(select(func.count()).select_from(AuditEntry)
                              .where(AuditEntry.action == "reference.requested")) == 1

    # A new deployment is a new state: a new request, even with the old one still open.
    add_version(engine, seed.model, VersionKind.unlearned, seed.samples["alice"], deploy=True)
    third = client.post(f"/models/{seed.model}/references").json()
    assert third["created"] is True and third["excluded_sample_count"] == 6


def test_an_admin_asks_again_for_a_deployment_whose_reference_failed_every_attempt(client, engine, seed, settings):
    from workers.references.training import record_reference_failure

    first = client.post(f"/models/{seed.model}/references").json()
    for _ in range(settings.reference_max_attempts):
        record_reference_failure(engine, settings, first["id"], RuntimeError("disk full"))
    # The closed request is not given back: a new one is queued, with its attempts counted afresh.
    again = client.post(f"/models/{seed.model}/references").json()
    assert again["created"] is True and again["id"] != first["id"] and again["failed_attempts"] == 0
    with transaction(engine) as session:
        closed = session.get(ReferenceRequest, first["id"])
        assert (closed.failed_attempts, closed.error) == (settings.reference_max_attempts, "RuntimeError: disk full")
        assert closed.finished_at is not None and closed.reference_version_id is None


@pytest.mark.parametrize("role", ["auditor", "submitter"])
def test_only_an_admin_queues_a_reference(client, engine, seed, bearer, role):
    response = client.post(f"/models/{seed.model}/references", headers=bearer(role))
    assert response.status_code == 403
    assert counts(engine, ReferenceRequest) == [0]


def test_a_reference_for_an_unknown_or_malformed_model_is_refused(client, engine, seed):
    response = client.post("/models/nope/references")
    assert (response.status_code, response.json()) == (404, {"detail": "model 'nope' not found"})
    response = client.post("/models/" + "m" * 65 + "/references")
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["path", "model"]
    with transaction(engine) as session:
        session.add(Model(name="untrained", dataset="digits", spec={}))
    response = client.post("/models/untrained/references")
    assert response.status_code == 409 and "no deployed version" in response.json()["detail"]
    assert counts(engine, ReferenceRequest) == [0]


# GET /audit/versions/{id}


def test_version_audit_404_and_422(client, seed):
    response = client.get("/audit/versions/9999")
    assert (response.status_code, response.json()) == (404, {"detail": "model version 9999 not found"})
    for bad in ("abc", "0", "-1", str(2**31)):
        response = client.get(f"/audit/versions/{bad}")
        assert response.status_code == 422, bad
        assert response.json()["detail"][0]["loc"] == ["path", "version_id"]


def test_version_audit_roles(client, seed, bearer):
    assert client.get(f"/audit/versions/{seed.version_id}", headers=bearer("auditor")).status_code == 200
    assert client.get(f"/audit/versions/{seed.version_id}", headers=bearer("submitter")).status_code == 403


def test_version_audit_states(client, engine, seed):
    alice, bob = seed.samples["alice"], seed.samples["bob"]
    original = client.get(f"/audit/versions/{seed.version_id}").json()
    assert original["status"] == "not_applicable" and "excludes no samples" in original["message"]

    version = add_version(engine, seed.model, VersionKind.unlearned, alice + bob, deploy=True)
    body = client.get(f"/audit/versions/{version}").json()
    assert (body["status"], body["reference"]["status"], body["evaluation"]) == ("missing_reference", "missing", None)
    assert "no retrain reference" in body["message"]
    assert (body["method"], body["config"], body["excluded_sample_count"]) == ("qmul", {"epochs": 3}, 12)

    stale = add_version(engine, seed.model, VersionKind.reference, alice)
    body = client.get(f"/audit/versions/{version}").json()
    assert body["status"] == "stale_reference" and body["evaluation"] is None
    assert body["reference"]["reference_id"] == stale
    assert body["reference"]["missing_from_reference"] == sorted(bob)
    assert body["reference"]["excluded_sample_ids"] == sorted(alice)
    assert "stale" in body["message"] and f"POST /models/{seed.model}/references" in body["message"]

    matching = add_version(engine, seed.model, VersionKind.reference, alice + bob)
    body = client.get(f"/audit/versions/{version}").json()
    assert (body["status"], body["reference"]["status"]) == ("not_evaluated", "matching")
    assert body["reference"]["reference_id"] == matching

    evaluation = add_evaluation(engine, version, matching)
    body = client.get(f"/audit/versions/{version}").json()
    assert body["status"] == "current"
    assert (body["evaluation"]["id"], body["evaluation"]["reference_id"]) == (evaluation, matching)
    # Recorded without MIA's spread (as evaluations made before MIA was averaged over draws): MIA_sd null.
    assert body["evaluation"]["metrics"] == {**METRICS, "MIA_sd": None} and body["evaluation"]["gaps"] == GAPS
    assert (body["evaluation"]["forget_count"], body["evaluation"]["test_count"]) == (6, 360)

    reference_audit = client.get(f"/audit/versions/{matching}").json()
    assert reference_audit["status"] == "not_applicable" and reference_audit["kind"] == "reference"


def test_an_evaluation_against_a_reference_of_another_set_is_not_current(client, engine, seed):
    # Never papered over: such an evaluation (not one the workers make) does not make a version current.
    version = add_version(engine, seed.model, VersionKind.unlearned, seed.samples["alice"], deploy=True)
    other = add_version(engine, seed.model, VersionKind.reference, seed.samples["bob"])
    add_evaluation(engine, version, other)
    assert client.get(f"/audit/versions/{version}").json()["status"] == "stale_reference"
    audit = client.get("/audit").json()
    assert (audit["status"], audit["reference"]["status"]) == ("stale", "stale")
    assert "stale" in audit["message"]


def test_audit_names_the_reference_state_of_the_deployment(client, engine, seed):
    version = add_version(engine, seed.model, VersionKind.unlearned, seed.samples["alice"], deploy=True)
    audit = client.get("/audit").json()
    assert (audit["status"], audit["reference"]["status"]) == ("missing", "missing")
    assert "no retrain reference has been trained" in audit["message"]
    reference = add_version(engine, seed.model, VersionKind.reference, seed.samples["alice"])
    add_evaluation(engine, version, reference)
    audit = client.get("/audit").json()
    assert (audit["status"], audit["reference"]["status"]) == ("current", "matching")


# GET /forget-requests/{id}/evidence


def file_request(engine, seed, subject) -> str:
    with transaction(engine) as session:
        return file_forget_request(session, subject_id=subject, sample_ids=None, model_name=seed.model,
                                   deadline_days=30, actor="test").request.id


def complete(engine, seed, request_id, version_id) -> None:
    """Mark the request (its one part, the seed model's) completed by version_id, through a batch run from
    the seed's original."""
    with transaction(engine) as session:
        batch = Batch(model_name=seed.model, status=BatchStatus.completed, parent_version_id=seed.version_id,
                      result_version_id=version_id, finished_at=utcnow())
        session.add(batch)
        session.flush()
        request = session.get(ForgetRequest, request_id)
        part = session.get(ForgetRequestPart, (request_id, seed.model))
        part.status, part.batch_id = RequestStatus.completed, batch.id
        part.completed_version_id, part.completed_at = version_id, utcnow()
        if all(p.status == RequestStatus.completed for p in request.parts):
            request.status, request.completed_at = RequestStatus.completed, part.completed_at
        else:
            request.status = RequestStatus.batched


def add_scores(engine, version_id, sample_ids, correct, confidence, member, logits=None) -> None:
    with transaction(engine) as session:
        session.add_all(SampleScore(version_id=version_id, sample_id=sample_id, correct=correct[i],
                                    confidence=confidence[i], member=member[i],
                                    confidence_logit=None if logits is None else logits[i])
                        for i, sample_id in enumerate(sample_ids))


def test_a_pending_request_has_no_figures(client, engine, seed):
    request_id = file_request(engine, seed, "carol")
    body = client.get(f"/forget-requests/{request_id}/evidence").json()
    assert (body["status"], body["request_status"], body["sample_count"]) == ("pending", "pending", 3)
    assert body["before"] is None and body["after"] is None and body["reference"] is None and body["samples"] == []
    assert "no version has forgotten" in body["message"]


def test_evidence_404_422_and_roles(client, engine, seed, bearer):
    response = client.get("/forget-requests/nope/evidence")
    assert (response.status_code, response.json()) == (404, {"detail": "forget request 'nope' not found"})
    response = client.get("/forget-requests/" + "x" * 37 + "/evidence")
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["path", "request_id"]
    request_id = file_request(engine, seed, "carol")
    for role in ("submitter", "auditor"):
        assert client.get(f"/forget-requests/{request_id}/evidence", headers=bearer(role)).status_code == 200
    with transaction(engine) as session:
        session.add(Model(name="other", dataset="digits", spec={}))
    limited = bearer("submitter", model="other")
    assert client.get(f"/forget-requests/{request_id}/evidence", headers=limited).status_code == 404


def test_evidence_of_a_request_with_several_parts_names_the_model(client, engine, seed, bearer):
    add_model(engine, "digits-other")
    with transaction(engine) as session:
        request_id = file_forget_request(session, subject_id="carol", sample_ids=None, model_name=None,
                                         deadline_days=30, actor="test").request.id
    response = client.get(f"/forget-requests/{request_id}/evidence")
    assert response.status_code == 422
    [problem] = response.json()["detail"]
    assert (problem["type"], problem["loc"]) == ("unknown_part", ["query", "model"])
    assert "digits-cnn-4bit, digits-other" in problem["msg"]
    assert client.get(f"/forget-requests/{request_id}/evidence", params={"model": "nope"}).status_code == 422
    for model in (seed.model, "digits-other"):
        body = client.get(f"/forget-requests/{request_id}/evidence", params={"model": model}).json()
        assert (body["model"], body["status"], body["sample_count"]) == (model, "pending", 3)
        assert f"part for model {model} is pending" in body["message"]

    # One part completed: its evidence has figures; the other part's is still pending.
    version = add_version(engine, seed.model, VersionKind.unlearned, seed.samples["carol"], deploy=True)
    complete(engine, seed, request_id, version)
    body = client.get(f"/forget-requests/{request_id}/evidence", params={"model": seed.model}).json()
    assert (body["model"], body["status"]) == (seed.model, "figures_missing")
    # A key limited to a model sees its own part, without naming it.
    body = client.get(f"/forget-requests/{request_id}/evidence", headers=bearer("submitter", "digits-other")).json()
    assert (body["model"], body["status"]) == ("digits-other", "pending")


def test_evidence_before_after_and_reference(client, engine, seed):
    carol = seed.samples["carol"]
    request_id = file_request(engine, seed, "carol")
    version = add_version(engine, seed.model, VersionKind.unlearned, carol, deploy=True)
    complete(engine, seed, request_id, version)
    add_scores(engine, seed.version_id, carol, [True, True, True], [0.9, 0.8, 1.0], [True, True, False])
    add_scores(engine, version, carol, [False, True, False], [0.2, 0.5, 0.2], [False, True, False])

    body = client.get(f"/forget-requests/{request_id}/evidence").json()
    assert body["status"] == "reference_missing" and body["reference"] is None
    before, after = body["before"], body["after"]
    assert (before["version_id"], before["sample_count"], before["accuracy"]) == (seed.version_id, 3, 100.0)
    assert before["mean_confidence"] == pytest.approx(0.9) and before["member_share"] == pytest.approx(200 / 3)
    assert (after["version_id"], after["accuracy"]) == (version, pytest.approx(100 / 3))
    assert after["mean_confidence"] == pytest.approx(0.3) and after["member_share"] == pytest.approx(100 / 3)
    first = body["samples"][0]
    assert first["sample_id"] == carol[0] and first["before"]["confidence"] == pytest.approx(0.9)
    assert first["after"]["correct"] is False and first["reference"] is None

    # A reference that never saw carol's samples but excludes more than the version: stale, said so.
    stale = add_version(engine, seed.model, VersionKind.reference, carol + seed.samples["alice"])
    add_scores(engine, stale, carol, [False, False, True], [0.1, 0.3, 0.6], [False, False, False])
    body = client.get(f"/forget-requests/{request_id}/evidence").json()
    assert body["status"] == "reference_stale" and body["reference"]["version_id"] == stale
    assert "stale" in body["message"]

    matching = add_version(engine, seed.model, VersionKind.reference, carol)
    add_scores(engine, matching, carol, [True, False, False], [0.6, 0.3, 0.3], [False, False, True])
    body = client.get(f"/forget-requests/{request_id}/evidence").json()
    assert body["status"] == "complete" and body["reference"]["version_id"] == matching
    assert body["reference"]["mean_confidence"] == pytest.approx(0.4)


def test_evidence_compares_the_version_with_the_reference_sample_by_sample(client, engine, seed):
    carol = seed.samples["carol"]
    request_id = file_request(engine, seed, "carol")
    version = add_version(engine, seed.model, VersionKind.unlearned, carol, deploy=True)
    complete(engine, seed, request_id, version)
    add_scores(engine, seed.version_id, carol, [True] * 3, [0.99] * 3, [True] * 3, [4.6] * 3)
    threshold = DIFFERENCE_THRESHOLD
    after_logits = [-1.0, 0.5, 2.0 + threshold + 0.5]  # the third is surer of its label than the reference
    add_scores(engine, version, carol, [False, True, True], [0.27, 0.62, 0.95], [False, False, True],
               after_logits)
    reference = add_version(engine, seed.model, VersionKind.reference, carol)
    # Without the logit-scaled confidence on the reference (figures recorded before it was kept): no comparison.
    add_scores(engine, reference, carol, [False, True, True], [0.3, 0.6, 0.88], [False, False, False])
    body = client.get(f"/forget-requests/{request_id}/evidence").json()
    assert body["status"] == "complete" and body["reference_comparison"] is None
    assert [sample["reference_difference"] for sample in body["samples"]] == [None] * 3

    with transaction(engine) as session:
        for sample_id, logit in zip(carol, [-0.8, 0.5, 2.0]):
            session.get(SampleScore, (reference, sample_id)).confidence_logit = logit
    body = client.get(f"/forget-requests/{request_id}/evidence").json()
    comparison = body["reference_comparison"]
    differences = [sample["reference_difference"] for sample in body["samples"]]
    assert differences == pytest.approx([-0.2, 0.0, threshold + 0.5])
    assert body["samples"][2]["after"]["confidence_logit"] == pytest.approx(after_logits[2])
    assert (comparison["version_id"], comparison["reference_id"], comparison["sample_count"]) == (
        version, reference, 3)
    assert comparison["mean_difference"] == pytest.approx((0.2 + threshold + 0.5) / 3)
    assert comparison["max_difference"] == pytest.approx(threshold + 0.5)
    assert (comparison["above_count"], comparison["above_share"]) == (1, pytest.approx(100 / 3))
    assert comparison["threshold"] == threshold and "seeds" in comparison["threshold_source"]
    assert comparison["verdict"] == "differs from the reference on 1 of 3 samples"

    # Closer than the threshold everywhere: indistinguishable on these samples.
    with transaction(engine) as session:
        session.get(SampleScore, (reference, carol[2])).confidence_logit = after_logits[2] - threshold / 2
    comparison = client.get(f"/forget-requests/{request_id}/evidence").json()["reference_comparison"]
    assert (comparison["above_count"], comparison["verdict"]) == (
        0, "indistinguishable from the reference on these samples")

    # The frozen form is a dump of the same schema: the comparison survives it, and an evidence frozen before
    # the comparison existed still reads, without one.
    with transaction(engine) as session:
        request = session.get(ForgetRequest, request_id)
        frozen = EvidencePublic.model_validate(request_evidence(session, request, request.parts[0])).model_dump(
            mode="json", exclude={"frozen_at"})
    assert EvidencePublic.model_validate(frozen).reference_comparison.verdict == comparison["verdict"]
    older = {**frozen, "samples": [{key: value for key, value in sample.items() if key != "reference_difference"}
                                   for sample in frozen["samples"]]}
    del older["reference_comparison"]
    assert EvidencePublic.model_validate(older).reference_comparison is None


def test_evidence_says_when_the_worker_recorded_no_figures(client, engine, seed):
    request_id = file_request(engine, seed, "carol")
    version = add_version(engine, seed.model, VersionKind.unlearned, seed.samples["carol"], deploy=True)
    complete(engine, seed, request_id, version)
    body = client.get(f"/forget-requests/{request_id}/evidence").json()
    assert body["status"] == "figures_missing" and f"version {seed.version_id}" in body["message"]


# GET /audit/report

SECTION_IDS = ("audit-summary", "audit-status", "reference-state", "gaps-over-time", "mia-distribution",
               "request-timeline")


def test_the_report_is_semantic_html_with_inline_svg(client, engine, seed):
    carol = seed.samples["carol"]
    request_id = file_request(engine, seed, "carol")
    file_request(engine, seed, "alice")
    version = add_version(engine, seed.model, VersionKind.unlearned, carol, deploy=True)
    complete(engine, seed, request_id, version)
    reference = add_version(engine, seed.model, VersionKind.reference, carol)
    histograms = {"bin_edges": [0.0, 0.01, 0.1, 1.0, 10.0],
                  "version": {"forget": [1, 1, 1, 0], "test": [10, 50, 30, 10]},
                  "reference": {"forget": [0, 1, 1, 1], "test": [10, 50, 30, 10]}}
    add_evaluation(engine, version, reference, histograms)

    response = client.get("/audit/report", params={"model": seed.model})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    for element_id in SECTION_IDS:
        assert f'id="{element_id}"' in page, element_id
    assert '<th scope="col">AG</th>' in page and "<script" not in page.lower()
    assert 'data-status="current"' in page and 'data-reference-status="matching"' in page
    # Three plots, inline, no external references.
    assert page.count("<svg") == 3 and "<?xml" not in page
    assert not re.search(r'(src|href)="https?://', page)
    mia = page[page.index('id="mia-distribution"'):page.index('id="request-timeline"')]
    assert "<svg" in mia and "forget samples" in mia
    assert "@media print" in page


def test_the_report_says_plainly_when_the_reference_is_stale_or_missing(client, engine, seed):
    page = client.get("/audit/report").text
    assert 'data-status="missing"' in page and "Status: missing evaluation, matching reference" not in page
    assert "No evaluations yet." in page and "No evaluation with membership score histograms yet." in page
    version = add_version(engine, seed.model, VersionKind.unlearned, seed.samples["alice"], deploy=True)
    page = client.get("/audit/report").text
    assert "Status: missing evaluation, missing reference." in page
    add_version(engine, seed.model, VersionKind.reference, seed.samples["bob"])
    page = client.get("/audit/report").text
    assert 'data-reference-status="stale"' in page and "Retrain reference: stale." in page
    assert "still in the reference&#x27;s training data" in page or "still in the reference's training data" in page
    assert str(version) in page


def test_the_report_roles_and_bad_input(client, seed, bearer):
    assert client.get("/audit/report", headers=bearer("auditor")).status_code == 200
    assert client.get("/audit/report", headers=bearer("submitter")).status_code == 403
    response = client.get("/audit/report", params={"model": "nope"})
    assert (response.status_code, response.json()) == (404, {"detail": "model 'nope' not found"})
    response = client.get("/audit/report", params={"model": "a\x00"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["query", "model"]
    response = client.get("/audit/report", params={"modle": seed.model})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["query", "modle"]
