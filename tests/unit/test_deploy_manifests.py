"""deploy/compose and deploy/k8s: the manifests validate offline and their references hold.

Kubernetes manifests are checked against the Kubernetes JSON schemas that ``kubernetes-validate``
carries in its package (strict: unknown fields are errors; no download). Custom resources (the
Prometheus Operator's ServiceMonitor) have no schema there and are checked by hand. The Compose
file goes through ``docker compose config -q`` where Docker Compose is installed; without it, its
structure is checked here: services, volumes, ports, mounts and build files that exist.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.api.stopping import PROBES
from proxy.config import load_config

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
COMPOSE = REPO / "deploy" / "compose"
KUBERNETES = "1.29"
"""The oldest Kubernetes release the manifests are validated against (and newer ones accept)."""
CUSTOM = {"monitoring.coreos.com/v1"}
"""API groups of custom resources: no schema in kubernetes-validate."""


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_objects() -> list[tuple[str, dict[str, Any]]]:
    kustomization = documents(K8S / "kustomization.yaml")[0]
    return [(name, doc) for name in kustomization["resources"] for doc in documents(K8S / name)]


def find(kind: str, name: str) -> dict[str, Any]:
    for _, doc in k8s_objects():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name} in deploy/k8s")


# --- deploy/k8s ----------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_and_only_existing_ones() -> None:
    kustomization = documents(K8S / "kustomization.yaml")[0]
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


@pytest.mark.parametrize("name", sorted(p.name for p in K8S.glob("*.yaml")))
def test_every_k8s_manifest_validates_against_the_kubernetes_schemas(name: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]'")
    for doc in documents(K8S / name):
        if doc["kind"] == "Kustomization":
            assert doc["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
            continue
        if doc["apiVersion"] in CUSTOM:
            continue  # a CRD: checked in test_servicemonitor_scrapes_the_service_port
        kv.validate(doc, KUBERNETES, strict=True)  # raises naming the field


def test_one_pod_with_every_gpu_of_the_node_probed_on_live_and_ready() -> None:
    deployment = find("Deployment", "ollamux")
    pod = deployment["spec"]["template"]
    assert (
        deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    )
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["livenessProbe"]["httpGet"]["path"] == "/proxy/live"
    assert container["startupProbe"]["httpGet"]["path"] == "/proxy/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/proxy/ready"
    assert {"/proxy/live", "/proxy/ready"} == PROBES  # the paths the proxy serves
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 11434}
    drain = load_config(COMPOSE / "ollamux.yaml").timeouts.drain
    assert pod["spec"]["terminationGracePeriodSeconds"] > drain
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} == set(volumes)
    find("ConfigMap", volumes["config"]["configMap"]["name"])
    find("PersistentVolumeClaim", volumes["models"]["persistentVolumeClaim"]["claimName"])


def test_services_select_their_pods_and_name_their_ports() -> None:
    for name in ("ollamux", "open-webui"):
        service = find("Service", name)
        pod = find("Deployment", name)["spec"]["template"]
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        named = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= named
    pdb = find("PodDisruptionBudget", "ollamux")
    pod = find("Deployment", "ollamux")["spec"]["template"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def test_servicemonitor_scrapes_the_service_port() -> None:
    monitor = find("ServiceMonitor", "ollamux")
    service = find("Service", "ollamux")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


def test_open_webui_points_at_the_ollamux_service() -> None:
    pod = find("Deployment", "open-webui")["spec"]["template"]
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    service = find("Service", "ollamux")
    assert env["OLLAMA_BASE_URL"] == f"http://ollamux:{service['spec']['ports'][0]['port']}"
    assert env["ENABLE_FORWARD_USER_INFO_HEADERS"] == "true"


def test_the_configmap_holds_the_container_config_which_loads(tmp_path: Path) -> None:
    text = find("ConfigMap", "ollamux-config")["data"]["ollamux.yaml"]
    assert text == (COMPOSE / "ollamux.yaml").read_text()  # one config for both
    (tmp_path / "ollamux.yaml").write_text(text)
    config = load_config(tmp_path / "ollamux.yaml")
    assert config.listen == "0.0.0.0:11434"
    assert config.instances == "auto"


def test_kubectl_kustomize_builds_and_every_object_validates() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize deploy/k8s` not run")
    kv = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]'")
    built = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True
    )
    for doc in yaml.safe_load_all(built.stdout):
        assert doc["metadata"].get("namespace", "ollamux") == "ollamux"
        if doc["apiVersion"] not in CUSTOM:
            kv.validate(doc, KUBERNETES, strict=True)


# --- deploy/compose ------------------------------------------------------------------------------


def compose_file() -> dict[str, Any]:
    return documents(COMPOSE / "compose.yaml")[0]


def test_docker_compose_config_accepts_the_compose_file() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not installed: `docker compose config` not run")
    version = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
    if version.returncode:
        pytest.skip("docker has no compose plugin: `docker compose config` not run")
    checked = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE / "compose.yaml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stderr


def test_compose_references_hold() -> None:
    """What `docker compose config` would catch, and what it would not: files that exist."""
    compose = compose_file()
    services = compose["services"]
    assert set(services) == {"ollamux", "open-webui", "prometheus", "grafana"}
    named = set(compose["volumes"])
    used: set[str] = set()
    for name, service in services.items():
        assert "image" in service, name
        for dep in service.get("depends_on", []):
            assert dep in services, f"{name} depends on {dep}"
        for port in service.get("ports", []):
            assert re.fullmatch(r"\d+:\d+", port), f"{name}: {port}"
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name} mounts {source}, which is missing"
            else:
                assert source in named, f"{name} mounts the undeclared volume {source}"
                used.add(source)
    assert used == named
    published = [int(p.split(":")[0]) for s in services.values() for p in s.get("ports", [])]
    assert len(published) == len(set(published))


def test_compose_ollamux_gets_the_gpus_is_health_checked_and_feeds_open_webui() -> None:
    services = compose_file()["services"]
    ollamux = services["ollamux"]
    build = ollamux["build"]
    context = (COMPOSE / build["context"]).resolve()
    assert context == REPO and (context / build["dockerfile"]).is_file()
    (device,) = ollamux["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "/proxy/ready" in " ".join(ollamux["healthcheck"]["test"])
    grace = int(ollamux["stop_grace_period"].removesuffix("s"))
    assert grace > load_config(COMPOSE / "ollamux.yaml").timeouts.drain
    webui = services["open-webui"]
    assert webui["environment"]["OLLAMA_BASE_URL"] == "http://ollamux:11434"
    assert webui["environment"]["ENABLE_FORWARD_USER_INFO_HEADERS"] == "true"
    assert webui["depends_on"]["ollamux"]["condition"] == "service_healthy"


def test_compose_prometheus_loads_the_shipped_rules_and_grafana_the_dashboard() -> None:
    services = compose_file()["services"]
    mounts = dict(m.split(":")[:2] for m in services["prometheus"]["volumes"])
    assert mounts["../prometheus/alerts.yml"] == "/etc/prometheus/alerts.yml"
    config = documents(COMPOSE / mounts_source(mounts, "/etc/prometheus/prometheus.yml"))[0]
    assert config["rule_files"] == ["alerts.yml"]  # beside prometheus.yml in the container
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == ["ollamux:11434"]
    mounts = dict(m.split(":")[:2] for m in services["grafana"]["volumes"])
    dashboard = mounts["../grafana/ollamux.json"]
    provider = documents(COMPOSE / "grafana/provisioning/dashboards/ollamux.yaml")[0]
    assert str(Path(dashboard).parent) == provider["providers"][0]["options"]["path"]
    source = documents(COMPOSE / "grafana/provisioning/datasources/prometheus.yaml")[0]
    assert source["datasources"][0]["url"] == "http://prometheus:9090"


def mounts_source(mounts: dict[str, str], target: str) -> str:
    return next(source for source, into in mounts.items() if into == target)


def test_the_dockerfile_builds_on_ollama_from_files_that_exist() -> None:
    text = (COMPOSE / "Dockerfile").read_text()
    assert re.search(r"^ARG OLLAMA_IMAGE=ollama/ollama:\S+$", text, re.M)
    assert re.search(r"^FROM \$\{OLLAMA_IMAGE\}$", text, re.M)
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _ = line.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: missing from the build context"
            kept = (COMPOSE / "Dockerfile.dockerignore").read_text()
            assert f"!{source.rstrip('/')}" in kept, f"{source} is excluded from the context"
    assert "/proxy/ready" in text and 'ENTRYPOINT ["ollamux"]' in text
