"""Fixtures for tests that drive a real browser against a real API process.

- `database_url` (overrides the root one): a migrated, empty PostgreSQL database for this test only,
  so the root `engine`, `seed`, `api_key` fixtures work on it.
- `live_server` (function): `python -m service.cli api` on a free port against that database, the
  filesystem broker in tmp_path; its `url`, `settings` and log folder. Stopped after the test.
- `browser` (function): headless Chromium through Debian's chromedriver (selenium), a fresh profile,
  no network beyond the live server. Missing Chromium: the test is skipped, or fails under CI=true.
- `wait_for`: a callable polling a condition until it holds (browser work is asynchronous).
- `artifacts`: the folder test-artifacts/ at the top of the clone (git-ignored), for screenshots.
"""

import os
import shutil
import socket
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.cli.processes import Processes
from service.core.migrate import upgrade_database
from service.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("QFORGET_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("QFORGET_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")


@dataclass
class LiveServer:
    url: str
    settings: Settings
    log_dir: Path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def database_url(empty_postgres_url: str) -> str:
    upgrade_database(empty_postgres_url)
    return empty_postgres_url


@pytest.fixture
def live_server(database_url: str, tmp_path: Path):
    port = _free_port()
    settings = Settings(database_url=database_url, data_dir=tmp_path / "var", api_port=port, _env_file=None)
    settings.broker_folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QFORGET_DATABASE_URL": database_url,
           "QFORGET_DATA_DIR": str(settings.data_dir), "QFORGET_BROKER_URL": settings.broker_url,
           "QFORGET_API_HOST": "127.0.0.1", "QFORGET_API_PORT": str(port), "QFORGET_LOG_FORMAT": "text",
           "QFORGET_TORCH_THREADS": "1"}
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    processes = Processes(env, log_dir)
    processes.start("api", "api")
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        processes.wait_until(healthy, "the API to answer /health", timeout=60, interval=0.3)
        yield LiveServer(url=url, settings=settings, log_dir=log_dir)
    finally:
        processes.stop()


@pytest.fixture
def browser(tmp_path: Path):
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if missing:
        message = f"Chromium is not installed ({', '.join(missing)} missing; Debian: apt-get install chromium " \
                  "chromium-driver, as .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", "--disable-extensions", "--window-size=1400,2200",
                     f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(argument)
    # An explicit driver path: selenium's driver manager would otherwise try to download one.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")),
                              options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def artifacts() -> Path:
    folder = ROOT / "test-artifacts"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture
def wait_for():
    """`wait_for(condition, what, timeout=20)`: poll `condition` until it returns something truthy."""
    return _wait_for


def _wait_for(condition, what: str, timeout: float = 20.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
