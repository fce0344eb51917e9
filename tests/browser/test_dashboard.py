"""The operations dashboard in headless Chromium, against a live API on PostgreSQL."""

from selenium.webdriver.common.by import By

from service.core.models import Role
from tests.api.operations_seed import GAPS, HOLD_REASON, METRICS, REFERENCE_METRICS, seed_operations


def _queue_gpu_runs(settings, count: int) -> None:
    # Real Celery messages in the live server's broker folder; no worker consumes them.
    from service.core.tasks import UNLEARN_TASK
    from workers.celery_app import create_celery

    celery = create_celery(settings)
    for _ in range(count):
        celery.send_task(UNLEARN_TASK, args=["digits-cnn-4bit"])
    celery.close()


def _tile(browser, name: str) -> str:
    return browser.find_element(By.CSS_SELECTOR, f"#tile-{name} .value").text


def _bars(browser, chart: str) -> list[dict]:
    return [{"category": bar.get_attribute("data-category"), "series": bar.get_attribute("data-series"),
             "value": float(bar.get_attribute("data-value")), "height": float(bar.get_attribute("height"))}
            for bar in browser.find_elements(By.CSS_SELECTOR, f"{chart} rect.bar")]


def test_the_dashboard_draws_the_seeded_figures(live_server, browser, engine, seed, api_key, artifacts, wait_for):
    operations = seed_operations(engine, seed)
    _queue_gpu_runs(live_server.settings, 2)
    submitter, auditor = api_key(Role.submitter.value), api_key(Role.auditor.value)

    browser.get(f"{live_server.url}/dashboard")
    form = wait_for(lambda: browser.find_element(By.ID, "key-form").is_displayed(), "the key form")
    assert form and not browser.find_element(By.ID, "dashboard").is_displayed()

    # A key whose role may not read the figures is refused, and the page says why.
    browser.find_element(By.ID, "api-key").send_keys(submitter)
    browser.find_element(By.ID, "connect").click()
    error = wait_for(lambda: browser.find_element(By.ID, "key-error").text, "the refusal")
    assert "auditor" in error
    assert browser.execute_script("return sessionStorage.length") == 0

    browser.find_element(By.ID, "api-key").send_keys(auditor)
    browser.find_element(By.ID, "connect").click()
    wait_for(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-renders"), "the first render")
    assert browser.find_element(By.ID, "dashboard").is_displayed()
    assert not browser.find_element(By.ID, "key-form").is_displayed()

    assert _tile(browser, "open") == str(operations.pending_requests)
    assert _tile(browser, "past-due") == str(operations.past_due)
    assert "alert" in browser.find_element(By.ID, "tile-past-due").get_attribute("class")
    assert _tile(browser, "held") == "1"
    assert _tile(browser, "queue") == "2"
    assert _tile(browser, "oldest") == "35.0 d"

    requests = {bar["category"]: bar["value"] for bar in _bars(browser, "#chart-requests")}
    assert requests["pending"] == operations.pending_requests and requests["completed"] == 1
    durations = _bars(browser, "#chart-durations")
    # One batch of 40 s (in the 30-60 s bucket) and one of 95 s (60-120 s).
    assert [bar["value"] for bar in durations if bar["value"]] == [1, 1]
    assert "2 batches" in browser.find_element(By.ID, "durations-caption").text
    queues = {bar["category"]: bar["value"] for bar in _bars(browser, "#chart-queues")}
    assert queues["gpu queue"] == 2 and queues[f"pending samples {operations.model}"] == operations.pending_samples
    events = {bar["category"]: bar["value"] for bar in _bars(browser, "#chart-events")}
    assert events["held"] == 1 and events["claimed"] == 3
    for chart in browser.find_elements(By.CSS_SELECTOR, ".chart"):
        chart_id = chart.get_attribute("id") or chart.get_attribute("class")
        heights = [float(bar.get_attribute("height")) for bar in chart.find_elements(By.CSS_SELECTOR, "rect.bar")]
        assert heights and max(heights) > 0, f"{chart_id} drew no bar"

    evaluation = browser.find_element(By.ID, f"evaluation-{operations.model}")
    assert f"deployed version {operations.deployed_version_id}" in evaluation.text
    assert f"reference version {operations.reference_id}" in evaluation.text
    for metric in [*METRICS, "AG"]:
        cells = [td.text for td in evaluation.find_elements(By.CSS_SELECTOR, f"tr[data-metric='{metric}'] td")]
        expected_gap = f"{GAPS[metric]:.2f}"
        if metric == "AG":
            assert cells[-1] == expected_gap
        else:
            assert cells == [metric, f"{METRICS[metric]:.2f}", f"{REFERENCE_METRICS[metric]:.2f}", expected_gap]
    assert len(_bars(browser, f"#evaluation-{operations.model} .chart")) == 2 * len(METRICS)

    leases = browser.find_element(By.ID, "leases").text
    assert "worker-a" in leases and "min" in leases
    assert HOLD_REASON in browser.find_element(By.ID, "held").text

    browser.save_screenshot(str(artifacts / "dashboard.png"))

    # The key lives in the tab: a reload shows the figures without asking again.
    browser.refresh()
    wait_for(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-renders"), "the render after reload")
    assert not browser.find_element(By.ID, "key-form").is_displayed()
    browser.find_element(By.ID, "forget-key").click()
    assert browser.find_element(By.ID, "key-form").is_displayed()
    assert browser.execute_script("return sessionStorage.length") == 0
    console = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    # The submitter's 403 is the one error the browser reports; nothing else (CSP, scripts) failed.
    assert all("403" in entry["message"] for entry in console), console
