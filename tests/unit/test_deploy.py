"""deploy/: Kubernetes manifests validate, Prometheus rules check and pass their unit tests,
dashboards and compose are well-formed."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).parents[2] / "deploy"
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("jetstream.nats.io/v1beta2", "Stream")}


def manifests() -> list[tuple[str, dict[str, object]]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


@pytest.mark.parametrize(("name", "doc"), manifests(), ids=lambda v: v if isinstance(v, str) else "")
def test_manifest_is_valid(name: str, doc: dict[str, object]) -> None:
    if (doc["apiVersion"], doc["kind"]) in CRDS:
        assert doc["metadata"] and doc["spec"], name  # no schema ships for CRDs: shape only
        return
    kubernetes_validate.validate(doc, "1.37.0", strict=True)


def test_deployments_are_locked_down_and_probed() -> None:
    deployments = [doc for _, doc in manifests() if doc["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {"tradeengine-worker", "tradeengine-attribution"}  # type: ignore[index]
    for d in deployments:
        spec = d["spec"]  # type: ignore[index]
        if d["metadata"]["name"] == "tradeengine-worker":  # type: ignore[index]
            # Partitions under leases: several replicas, a new pod up before an old one goes.
            assert spec["replicas"] == 3 and spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        else:
            assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        (container,) = pod["containers"]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
        assert security["capabilities"]["drop"] == ["ALL"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["resources"]["limits"]["memory"]


def test_configmap_carries_the_design_variables() -> None:
    (config,) = [
        doc
        for _, doc in manifests()
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "tradeengine"
    ]  # type: ignore[index]
    data = config["data"]  # type: ignore[index]
    for name in ("POSITION_MODE", "POSITION_MODE_AWARE_CONFLICTS", "SAME_DIRECTION_CONFLICT_RESOLUTION",
                 "NATS_URL", "EXCHANGE", "HTTP_PORT", "LOG_FORMAT"):  # fmt: skip
        assert name in data


def test_prometheus_rules_check_and_unit_tests_pass() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: `make test` installs it (scripts/ensure-system-deps)"
    rules = DEPLOY / "prometheus"
    subprocess.run([promtool, "check", "rules", "rules.yml"], cwd=rules, check=True, capture_output=True)
    subprocess.run([promtool, "test", "rules", "rules_test.yml"], cwd=rules, check=True, capture_output=True)


def test_every_alert_has_a_runbook() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    root = DEPLOY.parent
    for rule in rules["groups"][0]["rules"]:
        runbook = root / rule["annotations"]["runbook_url"]
        assert runbook.exists(), runbook
        assert rule["alert"] in runbook.read_text()


def test_compose_and_dashboards_are_well_formed() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert set(compose["services"]) == {"nats", "mysql", "worker", "attribution", "prometheus", "grafana"}
    boards = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
    titles = {json.loads(p.read_text())["title"] for p in boards}
    assert {
        "tradeengine / Strategy Performance",
        "tradeengine / Hedge Mode",
        "tradeengine / Multi-Strategy",
    } <= titles


def test_the_cluster_files_replicate_three_times() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.cluster.yaml").read_text())
    nodes = [name for name in compose["services"] if name.startswith("nats")]
    assert len(nodes) == 3
    for name in nodes:
        routes = compose["services"][name]["command"][-1].split(",")
        assert sorted(r.split("//")[1].split(":")[0] for r in routes) == sorted(set(nodes) - {name})
    for role in ("worker", "attribution"):
        assert compose["services"][role]["environment"]["STREAM_REPLICAS"] == "3"
    (stateful,) = [doc for _, doc in manifests() if doc["kind"] == "StatefulSet"]
    assert stateful["spec"]["replicas"] == 3  # type: ignore[index]
    streams = [doc for _, doc in manifests() if doc["kind"] == "Stream"]
    assert {s["spec"]["name"] for s in streams} == {"SIGNALS", "EVENTS", "CONTROL"}  # type: ignore[index]
    assert all(s["spec"]["replicas"] == 3 for s in streams)  # type: ignore[index]
