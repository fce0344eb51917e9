"""A real stack for integration tests: a fresh PostgreSQL database, a Redis database, a data folder
with a bootstrapped model, and a manager for the worker and scheduler processes.

- `make_stack(models=1, spec=None, **settings)`: builds a stack whose settings (and its processes'
  QFORGET_* environment) take the given overrides, with that many models bootstrapped on the digits
  (the default model, then "second-model"; from `spec`, else the digits CNN for five epochs): a
  request filed without a model goes to each; processes are stopped at the end of the test.
- `stack`: `make_stack()` with the defaults below.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.cli.processes import Processes
from service.core.api_keys import create_api_key
from service.core.db import get_engine, transaction
from service.core.settings import Settings
from workers.bootstrap import bootstrap, default_spec

REDIS_URL = "redis://127.0.0.1:6379/15"

# Fast and eager: one-second scheduling, every pending request due at once, short runs.
DEFAULTS = {
    "broker_url": REDIS_URL,
    "scheduler_interval_seconds": 1,
    "batch_min_samples": 1,
    "unlearn_epochs": 2,
    "torch_threads": 1,
    # Not under test here (tests/workers covers the gate): repeated runs on the small five-epoch
    # original can lose more test accuracy than the production margin allows.
    "quality_gate_max_ta_drop": 100,
}


@dataclass
class Stack:
    settings: Settings
    engine: object
    services: Processes

    def client(self) -> TestClient:
        # The API wants an API key: an admin one, made in-process as `qforget keys create` would.
        with transaction(self.engine) as session:
            _, key = create_api_key(session, role="admin", name="integration tests", actor="tests")
        return TestClient(create_app(self.settings), headers={"Authorization": f"Bearer {key}"})

    def file_requests(self, client: TestClient, subjects: list[str]) -> list[str]:
        request_ids = []
        for subject in subjects:
            response = client.post("/forget-requests", json={"subject_id": subject})
            assert response.status_code == 202, response.text
            request_ids.append(response.json()["id"])
        return request_ids

    def wait_for_completion(self, client: TestClient, request_ids: list[str], timeout: float = 300) -> list[dict]:
        def completed():
            bodies = [client.get(f"/forget-requests/{rid}").json() for rid in request_ids]
            return bodies if all(b["status"] == "completed" for b in bodies) else None

        return self.services.wait_until(completed, "the requests to complete", timeout=timeout)


@pytest.fixture
def make_stack(empty_postgres_url, tmp_path: Path):
    stacks = []

    def make(models: int = 1, spec=None, **overrides) -> Stack:
        values = {**DEFAULTS, "database_url": empty_postgres_url, "data_dir": tmp_path, **overrides}
        env = {f"QFORGET_{key.upper()}": str(value) for key, value in values.items()}
        settings = Settings(**values)
        redis.Redis.from_url(REDIS_URL).flushdb()
        for name in [settings.default_model, "second-model"][:models]:
            bootstrap(settings, name, spec or default_spec(epochs=5), progress=False)
        (tmp_path / "logs").mkdir(exist_ok=True)
        stack = Stack(settings, get_engine(settings, "tests"), Processes({**os.environ, **env}, tmp_path / "logs"))
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.services.stop()
    redis.Redis.from_url(REDIS_URL).flushdb()


@pytest.fixture
def stack(make_stack) -> Stack:
    return make_stack()
