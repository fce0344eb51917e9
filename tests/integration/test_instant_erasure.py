"""One erasure on a semi-parametric model through the API, against real PostgreSQL, Redis and Celery
worker and scheduler processes: the datastore drops the samples within seconds (the request shows
`instant` with the version, the artifact's ETag changes), then the batch unlearns the encoder and
the request is completed; the evidence shows both stages."""

import io
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest
import redis
import torch
from sqlalchemy import select

from service.core.db import transaction
from service.core.models import ModelVersion, Sample
from workers.bootstrap import bootstrap, default_spec
from workers.erasure import erase_request

pytestmark = pytest.mark.integration

MODEL = "spm-digits"
# Its own Redis database: other integration tests (db 15) flush theirs and run their own workers.
BROKER_URL = "redis://127.0.0.1:6379/13"
SUBJECT = "subject-0003"


def datastore_of(response) -> torch.Tensor:
    return state_of(response)["store_index"]


def state_of(response) -> dict:
    return torch.load(io.BytesIO(response.content), map_location="cpu", weights_only=True)["state_dict"]


def test_an_erasure_takes_instant_effect_then_completes(make_stack):
    redis.Redis.from_url(BROKER_URL).flushdb()
    # worker_nice 0: the instant stage is the control queue's, which must not starve behind other
    # processes as a niced training worker may (docs/design.md).
    stack = make_stack(models=0, default_model=MODEL, broker_url=BROKER_URL, worker_nice=0)
    bootstrap(stack.settings, MODEL, replace(default_spec(epochs=3), spm={"embed_dim": 32, "k": 8}), progress=False)
    with transaction(stack.engine) as session:
        indices = set(session.scalars(select(Sample.dataset_index).where(Sample.subject_id == SUBJECT)))
    # No scheduler yet: the API's own wake-up after filing starts the instant stage.
    stack.services.start("worker", "worker", "--concurrency", "1")
    client = stack.client()
    first = client.get("/models/deployed/artifact", params={"model": MODEL})
    assert first.status_code == 200 and indices <= set(datastore_of(first).tolist())

    filed = client.post("/forget-requests", json={"subject_id": SUBJECT})
    assert filed.status_code == 202, filed.text
    request_id = filed.json()["id"]

    def instant():
        body = client.get(f"/forget-requests/{request_id}").json()
        return body if body["status"] == "instant" else None

    body = stack.services.wait_until(instant, "the instant stage", timeout=60)
    [part] = body["parts"]
    assert part["status"] == "instant" and part["instant_version_id"] is not None and part["batch_id"] is None
    received, instant_at = (datetime.fromisoformat(body["received_at"]), datetime.fromisoformat(part["instant_at"]))
    # Within seconds of the worker being up (its start, some seconds, is in this figure).
    assert (instant_at - received).total_seconds() < 30

    # The edge artifact changed: a device holding the old one gets the new one, without the samples.
    assert client.get("/models/deployed/artifact", params={"model": MODEL},
                      headers={**client.headers, "If-None-Match": first.headers["etag"]}).status_code == 200
    second = client.get("/models/deployed/artifact", params={"model": MODEL})
    assert second.headers["etag"] != first.headers["etag"]
    assert not indices & set(datastore_of(second).tolist())
    assert len(datastore_of(second)) == len(datastore_of(first)) - len(indices)

    # A device holding the first artifact needs only the delta: dropping those rows gives the new datastore.
    delta = client.get("/models/deployed/datastore-delta",
                       params={"model": MODEL, "since": first.headers["etag"].strip('"')})
    assert delta.status_code == 200, delta.text
    assert delta.json()["removed_dataset_indices"] == sorted(indices)
    assert f'"{delta.json()["to_sha256"]}"' == second.headers["etag"]
    old, new = state_of(first), state_of(second)
    kept = ~torch.isin(old["store_index"], torch.tensor(delta.json()["removed_dataset_indices"]))
    for buffer in ("store_index", "store_codes", "store_scales", "store_labels"):
        assert torch.equal(old[buffer][kept], new[buffer])

    evidence = client.get(f"/forget-requests/{request_id}/evidence").json()
    assert evidence["status"] == "pending" and evidence["instant"]["version_id"] == part["instant_version_id"]

    stack.services.start("scheduler", "scheduler")  # the batch is due at once (batch_min_samples 1)
    [body] = stack.wait_for_completion(client, [request_id], timeout=300)
    [part] = body["parts"]
    assert part["status"] == "completed" and part["completed_version_id"] != part["instant_version_id"]
    assert datetime.fromisoformat(part["instant_at"]) < datetime.fromisoformat(part["completed_at"])
    final = client.get("/models/deployed/artifact", params={"model": MODEL})
    assert final.headers["etag"] not in (first.headers["etag"], second.headers["etag"])
    assert not indices & set(datastore_of(final).tolist())  # the batch's version keeps them out
    # The encoder changed: every embedding did, no delta leads there.
    assert client.get("/models/deployed/datastore-delta", params={
        "model": MODEL, "since": second.headers["etag"].strip('"')}).status_code == 409

    evidence = client.get(f"/forget-requests/{request_id}/evidence").json()
    stage = evidence["instant"]
    assert stage["before"]["sample_count"] == stage["after"]["sample_count"] == len(indices)
    assert evidence["before"]["version_id"] == part["instant_version_id"]  # the batch ran from the instant version
    assert evidence["after"]["version_id"] == part["completed_version_id"]
    log = client.get("/audit/log", params={"object_id": request_id}).json()["data"]
    assert {"request.received", "request.part_instant", "request.part_completed", "request.completed"} <= {
        entry["action"] for entry in log}

    # The erasure of copies (its window passed): no file the model store keeps holds the samples'
    # embeddings, or an encoder trained with them.
    stack.services.kill("scheduler")
    assert erase_request(stack.engine, stack.settings, request_id)
    with transaction(stack.engine) as session:
        versions = session.scalars(select(ModelVersion).where(ModelVersion.model_name == MODEL)).all()
        kept = {Path(v.artifact_path).name: v for v in versions if v.artifact_deleted_at is None}
        deleted = [v.id for v in versions if v.artifact_deleted_at is not None]
    assert part["instant_version_id"] in deleted and len(deleted) == 2  # the original and the instant version
    for path in Path(stack.settings.model_store).glob("*.pt"):
        assert path.name in kept, f"{path.name} is no version's kept artifact"
        payload = torch.load(path, map_location="cpu", weights_only=True)
        assert not indices & set(payload["state_dict"]["store_index"].tolist())


def test_a_lost_wake_up_is_sent_again_by_the_scheduler(make_stack):
    redis.Redis.from_url(BROKER_URL).flushdb()
    stack = make_stack(models=0, default_model=MODEL, broker_url=BROKER_URL, worker_nice=0,
                       batch_min_samples=1000, batch_max_wait_seconds=3600)  # no batch: the instant stage alone
    bootstrap(stack.settings, MODEL, replace(default_spec(epochs=1), spm={"embed_dim": 16, "k": 4}), progress=False)
    client = stack.client()
    filed = client.post("/forget-requests", json={"subject_id": SUBJECT})
    assert filed.status_code == 202 and filed.json()["status"] == "pending"
    redis.Redis.from_url(BROKER_URL).flushdb()  # the API's wake-up is lost before any worker took it
    stack.services.start("worker", "worker", "--concurrency", "1")
    stack.services.start("scheduler", "scheduler")

    def instant():
        body = client.get(f"/forget-requests/{filed.json()['id']}").json()
        return body if body["status"] == "instant" else None

    [part] = stack.services.wait_until(instant, "the instant stage", timeout=120)["parts"]
    assert part["instant_version_id"] is not None and part["batch_id"] is None
