"""The compose stack's configuration: docker-compose accepts it, promtool accepts Prometheus's
config and alert rules, and Grafana's dashboard and the alerts ask only for metrics /metrics has."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.api.operations_seed import seed_operations

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "qforget.json"
PROMETHEUS = ROOT / "docker" / "prometheus"
METRIC_NAME = re.compile(r"\bqforget_[a-z0-9_]+")
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",), "summary": ("_sum", "_count")}


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is missing (Debian package {package}; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)


def test_docker_compose_accepts_the_stack():
    checked = run(tool("docker-compose", "docker-compose"), "config", "-q")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert {"api", "worker", "scheduler", "flower", "prometheus", "grafana"} <= set(services)
    for volume in services["prometheus"]["volumes"] + services["grafana"]["volumes"]:
        source = volume.split(":")[0]
        if source.startswith("./"):
            assert (ROOT / source).exists(), f"{source} is mounted but missing"


def test_promtool_accepts_the_prometheus_config_and_rules():
    promtool = tool("promtool", "prometheus")
    checked = run(promtool, "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert checked.returncode == 0 and "alerts.yml" in checked.stdout, checked.stdout + checked.stderr
    checked = run(promtool, "check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def exposed_names(exposition: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(exposition):
        names.add(family.name)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


def queried_names() -> dict[str, set[str]]:
    """{where: metric names} for the Grafana dashboard's queries and the alert rules."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    alerts = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    return {"grafana": {name for expr in exprs for name in METRIC_NAME.findall(expr)},
            "alerts": {name for expr in alerts for name in METRIC_NAME.findall(expr)}}


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_grafana_and_the_alerts_use_only_exposed_metrics(anonymous, engine, seed):
    seed_operations(engine, seed)
    exposed = exposed_names(anonymous.get("/metrics").text)
    for where, names in queried_names().items():
        assert names, f"{where} queries no qforget_ metric"
        assert names <= exposed, f"{where} asks for metrics /metrics lacks: {sorted(names - exposed)}"
    # And the dashboard shows each family at least once (no figure left out of the Grafana view).
    families = {family.name for family in text_string_to_metric_families(anonymous.get("/metrics").text)}
    shown = {name for name in queried_names()["grafana"]}
    missing = {family for family in families if not any(name.startswith(family) for name in shown)}
    assert not missing, f"the Grafana dashboard shows no panel for {sorted(missing)}"
