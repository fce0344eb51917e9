"""A model quantized after training (`qforget bootstrap --ptq`) through the service: bootstrapped
with a synthetic calibration, unlearned by a real run, its retrain reference made by the same
recipe, audited; its lineage says that quantizing read no sample. And one quantized from a
full-precision checkpoint, refused once erasures were asked.

PostgreSQL only (the database the workers run on in production); about half a minute on one thread.
"""

import hashlib

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.api.app import create_app
from service.core.api_keys import create_api_key
from service.core.db import get_engine, transaction
from service.core.models import AuditEntry, Model, ModelVersion
from service.requests.intake import file_forget_request
from workers import engine as qf
from workers.batches.claims import claim_batch
from workers.batches.run import run_batch
from workers.bootstrap import bootstrap, default_spec
from workers.evaluation.deployment import evaluate_deployment
from workers.references.training import train_reference

SYNTHETIC = {"method": "percentile", "calibration": "synthetic", "synthesizer": "noise", "samples": 64}


def deployed_entry(session, version_id: int) -> AuditEntry:
    return session.scalars(select(AuditEntry).where(AuditEntry.action == "model.deployed",
                                                    AuditEntry.object_id == str(version_id))).one()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_synthetically_calibrated_model_is_unlearned_audited_and_says_it_read_no_sample(
        settings, one_torch_thread, tmp_path):
    settings = settings.model_copy(update={"unlearn_epochs": 1, "quality_gate_max_ta_drop": 100})
    engine = get_engine(settings, "tests")

    # A full-precision checkpoint trained elsewhere, quantized by the service: its hash is on record.
    spec = default_spec(epochs=2, ptq={"method": "minmax", "calibration": "real", "samples": 64})
    float_model = qf.train_model(spec.full_precision().build(), spec.load_data().train, spec.train, progress=False)
    checkpoint = tmp_path / "float.pt"
    torch.save(float_model.state_dict(), checkpoint)
    from_checkpoint = bootstrap(settings, "from-checkpoint", spec, progress=False, float_checkpoint=checkpoint)

    original = bootstrap(settings, settings.default_model, default_spec(epochs=2, ptq=SYNTHETIC), progress=False)
    with transaction(engine) as session:
        request_id = file_forget_request(session, subject_id="subject-0001", sample_ids=None,
                                         model_name=settings.default_model, deadline_days=30, actor="test").request.id
        _, key = create_api_key(session, role="auditor", name="tests", actor="tests")
        checkpoint_entry = deployed_entry(session, from_checkpoint).details["quantization"]
        entry = deployed_entry(session, original).details["quantization"]
        version = session.get(ModelVersion, original)
        assert (version.method, version.config["ptq"]["calibration"]) == ("ptq-percentile", "synthetic")
        assert version.metrics["TA"] > 50  # quantized after 2 epochs on the digits: far above chance (10)
    assert checkpoint_entry["float_checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert checkpoint_entry["calibration_read_samples"] is True
    assert entry == {"procedure": "post-training quantization", "method": "percentile", "calibration": "synthetic",
                     "calibration_samples": 64, "calibration_read_samples": False, "synthesizer": "noise"}

    # Once an erasure is asked, a checkpoint trained outside the service's record may hold the samples.
    with pytest.raises(ValueError, match="asked to be erased"):
        bootstrap(settings, "late-checkpoint", spec, progress=False, float_checkpoint=checkpoint)
    with transaction(engine) as session:
        assert session.get(Model, "late-checkpoint") is None

    # The deployed model unlearns like any other, and its reference follows the same recipe.
    version_id = run_batch(engine, settings, claim_batch(engine, settings, settings.default_model))
    reference_id = train_reference(engine, settings, settings.default_model)
    assert evaluate_deployment(engine, settings, settings.default_model) is not None
    with transaction(engine) as session:
        reference = session.get(ModelVersion, reference_id)
        assert reference.config["ptq"] == version.config["ptq"] and len(reference.excluded_sample_ids) == 10
        assert session.get(Model, settings.default_model).deployed_version_id == version_id

    client = TestClient(create_app(settings), headers={"Authorization": f"Bearer {key}"})
    assert client.get(f"/forget-requests/{request_id}/evidence").json()["status"] == "complete"
    report = client.get("/audit/report", params={"model": settings.default_model})
    assert report.status_code == 200
    assert "quantizing read no sample of the data set" in report.text
    other = client.get("/audit/report", params={"model": "from-checkpoint"}).text
    assert "64 samples of the training split" in other and "read no sample" not in other
