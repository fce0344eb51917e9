"""Batches, the held-batch review (approve, discard) and rollback through the API, and /metrics."""

import shutil
import subprocess

import pytest
from sqlalchemy import select

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
    VersionKind,
)
from service.requests.intake import file_forget_request


@pytest.fixture
def held_batch(engine, seed) -> dict:
    """A batch the quality gate held: its version exists, undeployed; its request's one part (the
    seed model's) is attached to it, pending."""
    with transaction(engine) as session:
        request = file_forget_request(session, subject_id="alice", sample_ids=None, model_name=seed.model,
                                      deadline_days=30, actor="test").request
        batch = Batch(model_name=seed.model, status=BatchStatus.held, parent_version_id=seed.version_id,
                      hold_reason="test accuracy fell 9.00 points")
        session.add(batch)
        session.flush()
        version = ModelVersion(model_name=seed.model, kind=VersionKind.unlearned, parent_id=seed.version_id,
                               batch_id=batch.id, method="qmul", config={}, metrics={"TA": 80.0}, sha256="3" * 64,
                               artifact_path="/nonexistent/held.pt", excluded_sample_ids=seed.samples["alice"])
        session.add(version)
        session.flush()
        batch.result_version_id = version.id
        session.get(ForgetRequestPart, (request.id, seed.model)).batch_id = batch.id
        return {"batch_id": batch.id, "version_id": version.id, "request_id": request.id}


def test_a_held_batch_is_visible_with_its_reason(client, bearer, held_batch):
    response = client.get(f"/batches/{held_batch['batch_id']}", headers=bearer("auditor"))
    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["hold_reason"], body["request_count"]) == ("held", "test accuracy fell 9.00 points", 1)
    listed = client.get("/batches", params={"status": "held"}, headers=bearer("auditor")).json()
    assert listed["count"] == 1 and listed["data"][0]["id"] == held_batch["batch_id"]


def test_only_an_admin_decides(client, bearer, held_batch):
    for role in ("auditor", "submitter"):
        response = client.post(f"/batches/{held_batch['batch_id']}/approve", headers=bearer(role))
        assert response.status_code == 403, role


def test_approving_deploys_and_completes(client, engine, seed, held_batch):
    response = client.post(f"/batches/{held_batch['batch_id']}/approve")
    assert response.status_code == 200 and response.json()["status"] == "completed"
    with transaction(engine) as session:
        assert session.get(Model, seed.model).deployed_version_id == held_batch["version_id"]
        request = session.get(ForgetRequest, held_batch["request_id"])
        [part] = request.parts
        assert request.status == RequestStatus.completed and request.completed_at is not None
        assert (part.model_name, part.status, part.completed_version_id) == (
            seed.model, RequestStatus.completed, held_batch["version_id"])
        assert part.completed_at == request.completed_at
        # The model no longer holds alice's samples: forgotten by the approved version.
        forgotten = session.scalars(select(ForgottenSample).order_by(ForgottenSample.sample_id)).all()
        assert [(f.model_name, f.sample_id, f.version_id) for f in forgotten] == [
            (seed.model, sample_id, held_batch["version_id"]) for sample_id in seed.samples["alice"]]
        actions = session.scalars(select(AuditEntry.action).where(AuditEntry.action.in_(
            ["request.part_completed", "request.completed", "batch.completed"])).order_by(AuditEntry.id)).all()
        assert actions == ["request.part_completed", "request.completed", "batch.completed"]
    again = client.post(f"/batches/{held_batch['batch_id']}/approve")
    assert again.status_code == 409 and "not held" in again.json()["detail"]


def test_discarding_returns_the_requests_with_new_settings(client, engine, seed, held_batch):
    bad = client.post(f"/batches/{held_batch['batch_id']}/discard", json={"unlearn_settings": {"epochs": 0}})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "epochs"
    negative = client.post(f"/batches/{held_batch['batch_id']}/discard",
                           json={"unlearn_settings": {"grad_norm_batches": -1}})
    assert negative.status_code == 422 and negative.json()["detail"][0]["loc"][-1] == "grad_norm_batches"
    unknown = client.post(f"/batches/{held_batch['batch_id']}/discard", json={"unlearn_settings": {"epochz": 3}})
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["loc"][-1] == "epochz"
    no_method = client.post(f"/batches/{held_batch['batch_id']}/discard",
                            json={"unlearn_settings": {"method": "retrain"}})
    assert no_method.status_code == 422 and no_method.json()["detail"][0]["loc"][-1] == "method"
    not_qmul = client.post(f"/batches/{held_batch['batch_id']}/discard",
                           json={"unlearn_settings": {"method": "ft", "similar_labels": False}})
    assert not_qmul.status_code == 422 and "similar_labels are Q-MUL's settings" in not_qmul.text
    with transaction(engine) as session:
        assert session.get(Batch, held_batch["batch_id"]).status == BatchStatus.held  # nothing changed

    response = client.post(f"/batches/{held_batch['batch_id']}/discard",
                           json={"unlearn_settings": {"method": "qmul-no-agr", "epochs": 3, "lr": 0.001,
                                                      "grad_norm_batches": 5}})
    assert response.status_code == 200 and response.json()["status"] == "discarded"
    with transaction(engine) as session:
        assert session.get(Model, seed.model).unlearn_config == {"method": "qmul-no-agr", "epochs": 3, "lr": 0.001,
                                                                 "grad_norm_batches": 5}
        request = session.get(ForgetRequest, held_batch["request_id"])
        [part] = request.parts
        assert (request.status, part.status, part.batch_id) == (RequestStatus.pending, RequestStatus.pending, None)


def test_rollback_refuses_a_version_that_remembers(client, engine, seed, held_batch):
    client.post(f"/batches/{held_batch['batch_id']}/approve")
    refused = client.post(f"/models/{seed.model}/rollback", json={"version_id": seed.version_id})
    assert refused.status_code == 409 and "bring them back" in refused.json()["detail"]
    missing = client.post("/models/no-such-model/rollback", json={"version_id": seed.version_id})
    assert missing.status_code == 404
    with transaction(engine) as session:
        assert session.get(Model, seed.model).deployed_version_id == held_batch["version_id"]


def test_unknown_batch_is_404(client):
    assert client.get("/batches/999999").status_code == 404
    assert client.post("/batches/999999/approve").status_code == 404


def test_metrics_are_read_from_the_database(anonymous, engine, seed, held_batch, tmp_path):
    response = anonymous.get("/metrics")
    assert response.status_code == 200
    text = response.text
    assert f'qforget_forget_requests{{model="{seed.model}",status="pending"}} 1.0' in text
    assert f'qforget_batches{{model="{seed.model}",status="held"}} 1.0' in text
    assert f'qforget_deployed_version{{model="{seed.model}"}} {float(seed.version_id)}' in text
    promtool = shutil.which("promtool")
    if promtool:  # Debian's prometheus package; .ci/run installs it
        exposition = tmp_path / "metrics.txt"
        exposition.write_text(text)
        checked = subprocess.run([promtool, "check", "metrics"], stdin=exposition.open(), capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
