"""The audit report page (GET /audit/report, docs/audit.md) in headless Chromium."""

from selenium.webdriver.common.by import By

from service.core.models import Role
from tests.api.operations_seed import GAPS, METRICS, seed_operations


def test_the_audit_report_renders_with_its_sections(live_server, browser, engine, seed, api_key, artifacts):
    operations = seed_operations(engine, seed)
    # The report is a plain page behind an auditor key: the browser sends the header on every request.
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders",
                            {"headers": {"Authorization": f"Bearer {api_key(Role.auditor.value)}"}})
    browser.get(f"{live_server.url}/audit/report?model={operations.model}")

    status = browser.find_element(By.ID, "audit-status")
    assert status.get_attribute("data-status") == "current"
    figures = browser.find_element(By.ID, "audit-figures").text
    for metric in METRICS:
        assert f"{METRICS[metric]:.2f}" in figures, metric
    assert f"{GAPS['AG']:.2f}" in figures
    for section in ("audit-summary", "reference-state", "gaps-over-time", "mia-distribution", "request-timeline"):
        element = browser.find_element(By.ID, section)
        assert element.is_displayed(), section
        assert browser.find_element(By.ID, f"{section}-title").text, section
    # The evaluation-over-time plot is drawn (inline SVG with paths), not a placeholder sentence.
    paths = browser.find_elements(By.CSS_SELECTOR, "#gaps-over-time svg path")
    assert paths, "the gaps plot drew nothing"
    # The page's Content Security Policy lets its inline style sheet and the plots' styles through.
    assert browser.execute_script("return getComputedStyle(document.body).maxWidth") == "960px"  # 60rem
    refused = [entry["message"] for entry in browser.get_log("browser") if "Content Security Policy" in entry["message"]]
    assert not refused, refused
    browser.save_screenshot(str(artifacts / "audit-report.png"))
