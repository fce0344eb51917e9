"""Per-request evidence computed by a real run: bootstrap a small digits model, unlearn one
subject's samples with Q-MUL, train the retrain reference, evaluate; then read it through the API.

PostgreSQL only (the database the workers run on in production); about 20 s on one CPU thread.
"""

import math

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.api.app import create_app
from service.core.api_keys import create_api_key
from service.core.db import get_engine, transaction
from service.core.models import Evaluation, ModelVersion, SampleScore
from service.requests.intake import file_forget_request
from workers import engine as qf
from workers.batches.claims import claim_batch
from workers.batches.run import run_batch
from workers.bootstrap import bootstrap, default_spec
from workers.evaluation.deployment import evaluate_deployment
from workers.references.training import train_reference


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_evidence_before_and_after_a_real_run(settings, one_torch_thread):
    settings = settings.model_copy(update={"unlearn_epochs": 2, "quality_gate_max_ta_drop": 100})
    original = bootstrap(settings, settings.default_model, default_spec(epochs=3), progress=False)
    engine = get_engine(settings, "tests")
    with transaction(engine) as session:
        request_id = file_forget_request(session, subject_id="subject-0001", sample_ids=None,
                                         model_name=settings.default_model, deadline_days=30, actor="test").request.id
        _, key = create_api_key(session, role="auditor", name="tests", actor="tests")
    claimed = claim_batch(engine, settings, settings.default_model)
    version_id = run_batch(engine, settings, claimed)
    assert version_id is not None
    reference_id = train_reference(engine, settings, settings.default_model)
    evaluation_id = evaluate_deployment(engine, settings, settings.default_model)
    assert evaluation_id is not None

    with transaction(engine) as session:
        version = session.get(ModelVersion, version_id)
        reference = session.get(ModelVersion, reference_id)
        evaluation = session.get(Evaluation, evaluation_id)
        # The reference was trained without exactly the forgotten samples, and says so.
        assert reference.excluded_sample_ids == version.excluded_sample_ids and len(reference.excluded_sample_ids) == 10
        version_metrics, reference_metrics = dict(evaluation.metrics), dict(evaluation.reference_metrics)
        histograms = evaluation.score_histograms
        scored = set(session.scalars(select(SampleScore.version_id)))
    assert scored == {original, version_id, reference_id}
    assert sum(histograms["version"]["forget"]) == 10 and sum(histograms["reference"]["test"]) == evaluation.test_count

    client = TestClient(create_app(settings), headers={"Authorization": f"Bearer {key}"})
    body = client.get(f"/forget-requests/{request_id}/evidence").json()
    assert body["status"] == "complete", body["message"]
    assert (body["before"]["version_id"], body["after"]["version_id"], body["reference"]["version_id"]) == (
        original, version_id, reference_id)
    # The request is the whole forget split here: its accuracy is the evaluation's FA, per sample. MIA is the
    # mean over the attackers' draws, with their spread; a sample's membership call is the draws' majority.
    assert body["after"]["accuracy"] == pytest.approx(version_metrics["FA"])
    assert body["reference"]["accuracy"] == pytest.approx(reference_metrics["FA"])
    for metrics in (version_metrics, reference_metrics):
        assert 0 <= metrics["MIA"] <= 100 and metrics["MIA_sd"] >= 0
    for role in ("after", "reference"):
        calls = [sample[role]["member"] for sample in body["samples"]]
        assert body[role]["member_share"] == pytest.approx(100 * sum(calls) / len(calls))
    # The edge artifact, the integer export, forgot what the evaluated fake-quantized model forgot.
    export = body["integer_export"]
    assert export["within_tolerance"] and export["fake_quantized_FA"] == pytest.approx(body["after"]["accuracy"])
    assert abs(export["FA"] - export["fake_quantized_FA"]) <= 1.0
    # The per-sample comparison with the reference, on the logit-scaled confidence the workers now keep.
    comparison = body["reference_comparison"]
    assert (comparison["version_id"], comparison["reference_id"], comparison["sample_count"]) == (
        version_id, reference_id, 10)
    differences = [sample["reference_difference"] for sample in body["samples"]]
    assert comparison["max_difference"] == pytest.approx(max(abs(d) for d in differences))
    above = sum(abs(d) > comparison["threshold"] for d in differences)
    assert comparison["above_count"] == above
    assert comparison["verdict"] == ("indistinguishable from the reference on these samples" if above == 0
                                     else f"differs from the reference on {above} of 10 samples")
    for sample in body["samples"]:
        p = sample["after"]["confidence"]
        if 1e-3 < p < 1 - 1e-3:  # where the float32 probability is not near saturation, the logit is its log-odds
            assert sample["after"]["confidence_logit"] == pytest.approx(math.log(p / (1 - p)), abs=1e-3)
    # The original was trained on these samples: it gets them right, and the unlearned version moved.
    assert body["before"]["accuracy"] >= 80
    before = [sample["before"]["confidence"] for sample in body["samples"]]
    after = [sample["after"]["confidence"] for sample in body["samples"]]
    assert before != after and all(0 <= c <= 1 for c in before + after)

    audit = client.get(f"/audit/versions/{version_id}").json()
    assert audit["status"] == "current" and audit["evaluation"]["reference_id"] == reference_id
    page = client.get("/audit/report").text
    mia = page[page.index('id="mia-distribution"'):page.index('id="request-timeline"')]
    assert "<svg" in mia


class WorkerLost(Exception):
    pass


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_reference_cut_mid_training_resumes_from_its_checkpoint(settings, one_torch_thread, monkeypatch):
    # A GPU machine lost mid-reference: the request is sent again and its training continues from
    # the checkpoint, to the same reference an uncut run trains (same bytes, same sha256).
    from service.core.models import Model, ReferenceRequest
    from service.references.schedule import request_reference

    settings = settings.model_copy(update={"checkpoint_every_seconds": 0})
    bootstrap(settings, settings.default_model, default_spec(epochs=4), progress=False)
    engine = get_engine(settings, "tests")
    uncut_id = train_reference(engine, settings, settings.default_model)

    with transaction(engine) as session:
        request_id = request_reference(session, session.get(Model, settings.default_model), "test", "test").id
    checkpoints = settings.model_store / "checkpoints"
    original_batch = qf.Split.training_batch
    # The digits' 1,437 training samples make 23 batches of 64 an epoch: lost in the third epoch.
    batches = {"served": 0, "lost_at": 2 * 23 + 5}

    def counted(self, index, generator, device):
        batches["served"] += 1
        if batches["served"] == batches["lost_at"]:
            raise WorkerLost
        return original_batch(self, index, generator, device)

    monkeypatch.setattr(qf.Split, "training_batch", counted)
    with pytest.raises(WorkerLost):
        train_reference(engine, settings, settings.default_model, request_id)
    [checkpoint] = checkpoints.glob(f"reference-{request_id}-*.pt")
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2

    batches.update(served=0, lost_at=None)
    resumed_id = train_reference(engine, settings, settings.default_model, request_id)
    assert batches["served"] == 2 * 23  # epochs 3 and 4 only: it resumed, it did not start over
    assert list(checkpoints.glob("*.pt")) == []
    with transaction(engine) as session:
        uncut, resumed = session.get(ModelVersion, uncut_id), session.get(ModelVersion, resumed_id)
        assert resumed.sha256 == uncut.sha256 and resumed.excluded_sample_ids == uncut.excluded_sample_ids
        assert session.get(ReferenceRequest, request_id).reference_version_id == resumed_id
