"""A real stack for integration tests: a fresh PostgreSQL database, a Redis database, a data folder
with a bootstrapped model, and a manager for the worker and scheduler processes."""

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from service.db import get_engine
from service.processes import Processes
from service.settings import Settings
from workers.bootstrap import bootstrap, default_spec

REDIS_URL = "redis://127.0.0.1:6379/15"


@dataclass
class Stack:
    settings: Settings
    engine: object
    services: Processes


@pytest.fixture
def stack(empty_postgres_url, tmp_path: Path):
    redis.Redis.from_url(REDIS_URL).flushdb()
    env = {
        "QFORGET_DATABASE_URL": empty_postgres_url,
        "QFORGET_BROKER_URL": REDIS_URL,
        "QFORGET_DATA_DIR": str(tmp_path),
        "QFORGET_SCHEDULER_INTERVAL_SECONDS": "1",
        "QFORGET_BATCH_MIN_SAMPLES": "1",
        "QFORGET_UNLEARN_EPOCHS": "2",
        "QFORGET_TORCH_THREADS": "1",
    }
    settings = Settings(**{key.removeprefix("QFORGET_").lower(): value for key, value in env.items()})
    bootstrap(settings, settings.default_model, default_spec(epochs=5), progress=False)
    (tmp_path / "logs").mkdir()
    services = Processes({**os.environ, **env}, tmp_path / "logs")
    yield Stack(settings, get_engine(settings, "tests"), services)
    services.stop()
    redis.Redis.from_url(REDIS_URL).flushdb()
