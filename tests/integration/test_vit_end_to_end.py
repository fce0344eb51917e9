"""A quantized vision transformer through the whole service: bootstrapped, unlearned by the worker
with LetheViT (the service-wide QFORGET_UNLEARN_METHOD), audited against a retrain reference, and
fetched by an edge device, whose copy rebuilds as an integer model that repeats it."""

import hashlib

import pytest
import torch

from service.core.db import transaction
from service.core.models import Model, ModelVersion, VersionKind
from service.core.tasks import REFERENCE_TASK
from workers import engine as qf
from workers.bootstrap import default_spec
from workers.celery_app import create_celery

pytestmark = pytest.mark.integration

SUBJECTS = ["subject-0001", "subject-0002"]


@pytest.mark.timeout(1500)  # bootstrap, unlearning, reference and audit of a transformer on a shared CPU
def test_a_vit_is_unlearned_with_lethevit_audited_and_served_to_edge_devices(make_stack, tmp_path):
    stack = make_stack(spec=default_spec(epochs=5, architecture="digits-vit"), default_model="digits-vit-4bit",
                       unlearn_method="lethevit")
    settings, engine, services = stack.settings, stack.engine, stack.services
    services.start("worker", "worker", "--concurrency", "1")
    services.start("scheduler", "scheduler")
    client = stack.client()
    request_ids = stack.file_requests(client, SUBJECTS)
    # Longer than the CNN's: the worker (niced) trains a transformer, on a CPU that may be shared.
    bodies = stack.wait_for_completion(client, request_ids, timeout=600)
    version_ids = {part["completed_version_id"] for body in bodies for part in body["parts"]}

    with transaction(engine) as session:
        model = session.get(Model, settings.default_model)
        assert model.spec["architecture"] == "digits-vit"
        deployed = session.get(ModelVersion, model.deployed_version_id)
        assert deployed.id == max(version_ids)
        assert deployed.kind == VersionKind.unlearned and deployed.method == "lethevit"
        assert deployed.config["mask_ratio"] == qf.LetheViTConfig().mask_ratio
        # The worker rebuilt the version's integer export (what an edge device runs) and compared it.
        export_check = deployed.metrics["integer_export"]
        assert "error" not in export_check and export_check["prediction_agreement"] >= 0.9
        sha256, artifact_path = deployed.sha256, deployed.artifact_path

    # An edge device fetches the deployed version, checks it, and runs it as integers.
    response = client.get("/models/deployed/artifact", params={"model": settings.default_model})
    assert response.status_code == 200
    assert response.headers["ETag"] == f'"{sha256}"' and hashlib.sha256(response.content).hexdigest() == sha256
    assert client.get("/models/deployed/artifact", params={"model": settings.default_model},
                      headers={"If-None-Match": f'"{sha256}"'}).status_code == 304
    fetched = tmp_path / f"{sha256}.pt"
    fetched.write_bytes(response.content)
    network, spec = qf.load_artifact(fetched, sha256)
    assert spec["model"]["architecture"] == "digits-vit"
    integer = qf.integer_model(qf.export_integer(network), **spec["model"])
    test = qf.load_dataset("digits", seed=0).test
    with torch.no_grad():
        agree = (integer(test.x).argmax(dim=1) == network(test.x).argmax(dim=1)).float().mean().item()
    assert agree >= 0.9
    assert fetched.read_bytes() == open(artifact_path, "rb").read()

    # The audit: a retrain reference of the same ViT recipe, then the gaps to it.
    create_celery(settings).send_task(REFERENCE_TASK, args=[settings.default_model])
    audit = services.wait_until(lambda: (a := client.get("/audit").json())["status"] == "current" and a,
                                "the audit evaluation", timeout=600)["evaluation"]
    assert audit["version_id"] == deployed.id
    for key in ("FA", "RA", "TA", "MIA"):
        assert 0 <= audit["metrics"][key] <= 100
        assert audit["gaps"][key] == pytest.approx(abs(audit["metrics"][key] - audit["reference_metrics"][key]))
