"""GET /models, /models/{version_id}, and the deployed artifact with its sha256 ETag."""

import hashlib
import logging
import os
from types import SimpleNamespace

import pytest
from sqlalchemy import update

from service.core.db import transaction
from service.core.models import Batch, BatchStatus, Model, ModelVersion, VersionKind
from service.deployments import artifacts

CONTENT = b"\x80quantized weights\x00" * 100_000  # about 2 MB: more than one chunk


def add_version(engine, model: str, **values) -> int:
    fields = {"model_name": model, "kind": VersionKind.unlearned, "method": "qmul", "config": {"epochs": 2},
              "metrics": {"TA": 96.5}, "sha256": "1" * 64, "artifact_path": "/nonexistent",
              "excluded_sample_ids": [], **values}
    with transaction(engine) as session:
        version = ModelVersion(**fields)
        session.add(version)
        session.flush()
        return version.id


def deploy(engine, model: str, version_id: int) -> None:
    with transaction(engine) as session:
        session.execute(update(Model).where(Model.name == model).values(deployed_version_id=version_id))


@pytest.fixture
def lineage(engine, seed) -> dict[str, int]:
    """original (seed) -> unlearned by a batch (deployed) ; and a reference."""
    with transaction(engine) as session:
        batch = Batch(model_name=seed.model, status=BatchStatus.completed, parent_version_id=seed.version_id)
        session.add(batch)
        session.flush()
        batch_id = batch.id
    unlearned = add_version(engine, seed.model, parent_id=seed.version_id, batch_id=batch_id,
                            excluded_sample_ids=seed.samples["alice"][:4])
    reference = add_version(engine, seed.model, kind=VersionKind.reference, method="retrain",
                            excluded_sample_ids=seed.samples["alice"][:4])
    deploy(engine, seed.model, unlearned)
    return {"original": seed.version_id, "unlearned": unlearned, "reference": reference, "batch": batch_id}


def test_versions_with_lineage_and_the_deployed_one(client, seed, lineage):
    response = client.get("/models")
    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 3
    versions = {v["id"]: v for v in body["data"]}
    assert [v["id"] for v in body["data"]] == [lineage["reference"], lineage["unlearned"], lineage["original"]]
    unlearned = versions[lineage["unlearned"]]
    assert unlearned == {
        "id": lineage["unlearned"], "model": seed.model, "kind": "unlearned", "deployed": True,
        "parent_id": lineage["original"], "batch_id": lineage["batch"], "method": "qmul",
        "config": {"epochs": 2}, "metrics": {"TA": 96.5}, "sha256": "1" * 64, "excluded_sample_count": 4,
        "approximate": False,
        "created_at": unlearned["created_at"],
    }
    assert not versions[lineage["original"]]["deployed"]
    assert versions[lineage["original"]]["excluded_sample_count"] == 0
    assert versions[lineage["reference"]]["kind"] == "reference"


def test_versions_filtered_and_paged(client, seed, lineage, engine):
    with transaction(engine) as session:
        session.add(Model(name="other", dataset="digits", spec={}))
    other = add_version(engine, "other", kind=VersionKind.original)
    assert [v["id"] for v in client.get("/models", params={"model": "other"}).json()["data"]] == [other]
    body = client.get("/models", params={"kind": "reference"}).json()
    assert (body["count"], [v["id"] for v in body["data"]]) == (1, [lineage["reference"]])
    body = client.get("/models", params={"limit": 1, "offset": 1}).json()
    assert (body["count"], [v["id"] for v in body["data"]]) == (4, [lineage["reference"]])
    assert client.get("/models", params={"kind": "bogus"}).status_code == 422


def test_one_version(client, seed, lineage):
    response = client.get(f"/models/{lineage['unlearned']}")
    assert response.status_code == 200
    assert (response.json()["parent_id"], response.json()["deployed"]) == (lineage["original"], True)
    response = client.get("/models/999999")
    assert (response.status_code, response.json()) == (404, {"detail": "model version 999999 not found"})
    assert client.get(f"/models/{2**31}").status_code == 422
    assert client.get("/models/zero").status_code == 422


@pytest.fixture
def artifact(engine, seed, tmp_path) -> dict:
    artifacts.clear_cache()
    sha256 = hashlib.sha256(CONTENT).hexdigest()
    path = tmp_path / f"{sha256}.pt"
    path.write_bytes(CONTENT)
    version_id = add_version(engine, seed.model, sha256=sha256, artifact_path=str(path))
    deploy(engine, seed.model, version_id)
    return {"path": path, "sha256": sha256, "version_id": version_id}


def test_the_deployed_artifact_is_streamed_with_its_sha256_as_etag(client, seed, artifact):
    response = client.get("/models/deployed/artifact", params={"model": seed.model})
    assert response.status_code == 200
    assert response.content == CONTENT
    assert response.headers["etag"] == f'"{artifact["sha256"]}"'
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-length"] == str(len(CONTENT))
    assert response.headers["x-model-version"] == str(artifact["version_id"])
    # The default model when none is named.
    assert client.get("/models/deployed/artifact").content == CONTENT


@pytest.mark.parametrize(
    "if_none_match",
    ['"{sha}"', 'W/"{sha}"', '"something-else", "{sha}"', "*"],
    ids=["strong", "weak", "in-a-list", "star"],
)
def test_a_current_copy_is_304(client, seed, artifact, if_none_match):
    header = if_none_match.format(sha=artifact["sha256"])
    response = client.get("/models/deployed/artifact", headers={"If-None-Match": header})
    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["etag"] == f'"{artifact["sha256"]}"'


def test_an_old_copy_gets_the_new_deployment(client, seed, artifact):
    response = client.get("/models/deployed/artifact", headers={"If-None-Match": f'"{"1" * 64}"'})
    assert (response.status_code, response.content) == (200, CONTENT)


def test_the_file_is_hashed_once_while_it_is_unchanged(client, seed, artifact, monkeypatch):
    calls = []

    def counting_sha256(*args):
        calls.append(1)
        return hashlib.sha256(*args)

    monkeypatch.setattr(artifacts, "hashlib", SimpleNamespace(sha256=counting_sha256))
    for _ in range(3):
        assert client.get("/models/deployed/artifact").status_code == 200
    assert len(calls) == 1


def test_a_file_that_does_not_match_its_sha256_is_never_served(client, seed, artifact, caplog):
    # First served and its hash cached, then changed on disk (same size, new mtime).
    assert client.get("/models/deployed/artifact").status_code == 200
    tampered = b"X" + CONTENT[1:]
    artifact["path"].write_bytes(tampered)
    stat = artifact["path"].stat()
    os.utime(artifact["path"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with caplog.at_level(logging.ERROR, logger="service.api.routes.models"):
        response = client.get("/models/deployed/artifact")
    assert response.status_code == 500
    assert b"quantized" not in response.content and b"XX" not in response.content
    assert "fails its sha256 check" in response.json()["detail"]
    assert any("integrity" in record.message and artifact["sha256"] in record.message for record in caplog.records)


def test_a_missing_file_is_a_500_that_is_logged(client, seed, artifact, caplog):
    artifact["path"].unlink()
    with caplog.at_level(logging.ERROR, logger="service.api.routes.models"):
        response = client.get("/models/deployed/artifact")
    assert response.status_code == 500
    assert any("cannot open" in record.message for record in caplog.records)


def test_no_such_model_or_no_deployment_is_404(client, seed, engine):
    response = client.get("/models/deployed/artifact", params={"model": "nope"})
    assert (response.status_code, response.json()) == (404, {"detail": "model 'nope' not found"})
    with transaction(engine) as session:
        session.add(Model(name="undeployed", dataset="digits", spec={}))
    response = client.get("/models/deployed/artifact", params={"model": "undeployed"})
    assert (response.status_code, response.json()) == (404, {"detail": "model 'undeployed' has no deployed version"})


def test_the_datastore_delta_refuses_what_it_cannot_answer(client, seed, bearer):
    """The route's checks (its answers for a semi-parametric model: tests/integration/test_instant_erasure.py)."""
    url = "/models/deployed/datastore-delta"
    since = "a" * 64
    malformed = client.get(url, params={"model": seed.model, "since": "not-a-sha256"})
    assert malformed.status_code == 422 and "since" in malformed.json()["detail"][0]["loc"]
    assert client.get(url, params={"model": seed.model}).status_code == 422  # since is required
    assert client.get(url, params={"model": "nope", "since": since}).status_code == 404
    parametric = client.get(url, params={"model": seed.model, "since": since})
    assert parametric.status_code == 409 and "not semi-parametric" in parametric.json()["detail"]
    assert client.get(url, params={"model": seed.model, "since": since},
                      headers=bearer("submitter")).status_code == 403
