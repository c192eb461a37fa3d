"""deploy/ray: the Serve config, the KubeRay RayService that embeds it, the PodMonitors that
scrape it; and deploy/prometheus/ray.yml, the scrape configuration for Ray nodes.

A RayService and a PodMonitor are custom resources, which kubernetes-validate has no schema
for: their structure is checked here, and the RayService's pod templates are validated as real
Kubernetes PodTemplateSpecs. Ray Serve's own schema (ServeDeploySchema) validates both Serve
configs in tests/integrations/test_ray_serve.py, which needs Ray's environment; there a real
Prometheus also scrapes a local cluster's replicas with deploy/prometheus/ray.yml.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.deploy.helpers import (
    DEPLOY,
    K8S,
    PROMETHEUS_CONFIG,
    RAY_PROMETHEUS_CONFIG,
    check_prometheus_config,
)
from tokenreward_service.config import Settings
from tokenreward_service.ray_serve import DEFAULT_OPTIONS, DEPLOYMENT

RAY = DEPLOY / "ray"
PROXY_CALLBACK = "tokenreward_service.ray_serve:proxy_middlewares"


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def rayservice() -> dict[str, Any]:
    (resource,) = load(RAY / "rayservice.yaml")
    return resource


def serve_config() -> dict[str, Any]:
    (config,) = load(RAY / "serve.yaml")
    return config


def the_deployment(config: dict[str, Any]) -> dict[str, Any]:
    (application,) = config["applications"]
    (deployment,) = application["deployments"]
    return deployment  # type: ignore[no-any-return]


def pod_templates() -> dict[str, dict[str, Any]]:
    cluster = rayservice()["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster["workerGroupSpecs"]:
        templates[group["groupName"]] = group["template"]
    return templates


def test_rayservice_is_a_kuberay_v1_rayservice() -> None:
    resource = rayservice()
    assert resource["apiVersion"] == "ray.io/v1"
    assert resource["kind"] == "RayService"
    assert set(resource) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(resource["spec"]) <= {
        "serveConfigV2",
        "rayClusterConfig",
        "upgradeStrategy",
        "serviceUnhealthySecondThreshold",
        "deploymentUnhealthySecondThreshold",
    }
    cluster = resource["spec"]["rayClusterConfig"]
    assert set(cluster) <= {
        "rayVersion",
        "enableInTreeAutoscaling",
        "autoscalerOptions",
        "headGroupSpec",
        "workerGroupSpecs",
    }
    for group in cluster["workerGroupSpecs"]:
        assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    assert all(isinstance(v, str) for v in cluster["headGroupSpec"]["rayStartParams"].values())


def test_serve_config_v2_is_deploy_ray_serve_yaml() -> None:
    """One Serve config: the RayService runs exactly what `serve run deploy/ray/serve.yaml`
    runs (the Ray Serve schema check is in tests/integrations/test_ray_serve.py)."""
    embedded = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    assert embedded == serve_config()


def test_serve_config_runs_the_service_builder_with_valid_settings() -> None:
    config = serve_config()
    (application,) = config["applications"]
    assert application["import_path"] == "tokenreward_service.ray_serve:build_app"
    assert application["route_prefix"] == "/"
    assert set(application["args"]) <= {"settings", "metrics_port"}
    settings = Settings(**application["args"]["settings"])
    assert settings.device == "cuda"
    deployment = the_deployment(config)
    assert deployment["name"] == DEPLOYMENT
    assert deployment["ray_actor_options"]["num_gpus"] == 1
    # The code's defaults and the shipped config agree.
    for option, value in DEFAULT_OPTIONS.items():
        assert deployment[option] == value, option
    # Ray stops a replica only after its requests (each within the request deadline) are done.
    assert deployment["graceful_shutdown_timeout_s"] >= settings.request_timeout_s
    autoscaling = deployment["autoscaling_config"]
    assert 1 <= autoscaling["min_replicas"] <= autoscaling["max_replicas"]
    assert autoscaling["downscale_delay_s"] >= autoscaling["upscale_delay_s"]


def test_resources_one_gpu_per_worker_and_replica() -> None:
    cluster = rayservice()["spec"]["rayClusterConfig"]
    deployment = the_deployment(serve_config())
    (head,) = pod_templates()["head"]["spec"]["containers"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replica there
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    (group,) = cluster["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    gpus = worker["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == worker["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert gpus // deployment["ray_actor_options"]["num_gpus"] >= 1
    cpus = float(worker["resources"]["requests"]["cpu"])
    assert cpus > deployment["ray_actor_options"]["num_cpus"]  # and the proxy, the raylet
    # Ray's autoscaler has a pod for every replica the Serve autoscaler may ask for.
    assert group["maxReplicas"] >= deployment["autoscaling_config"]["max_replicas"]
    for container in (head, worker):
        assert container["resources"]["requests"]["memory"]
        assert container["resources"]["limits"]["memory"]


def test_probes_and_the_proxy_callback() -> None:
    templates = pod_templates()
    (head,) = templates["head"]["spec"]["containers"]
    (worker,) = templates["gpu"]["spec"]["containers"]
    worker_ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    serve = serve_config()
    # Readiness of a worker: its Serve proxy (the port of http_options) routes to a replica.
    assert worker["readinessProbe"]["httpGet"]["path"] == "/-/healthz"
    assert (
        worker_ports[worker["readinessProbe"]["httpGet"]["port"]] == serve["http_options"]["port"]
    )
    assert worker["livenessProbe"]["httpGet"]["path"] == "/api/local_raylet_healthz"
    assert head["livenessProbe"]["httpGet"]["path"] == "/api/gcs_healthz"
    assert head["readinessProbe"]["httpGet"]["path"] == "/api/gcs_healthz"
    # Every node's proxy gives Ray's own errors the service's shape.
    for container in (head, worker):
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"]["value"] == PROXY_CALLBACK
    # Each replica's own /metrics port is exposed and announced.
    metrics_port = serve["applications"][0]["args"]["metrics_port"]
    assert worker_ports["metrics"] == metrics_port
    annotations = templates["gpu"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics_port)
    # The pod outlives the replica's drain, and so does Ray's own drain of the node on SIGTERM
    # (30 s unless set).
    drain = the_deployment(serve)["graceful_shutdown_timeout_s"]
    grace = templates["gpu"]["spec"]["terminationGracePeriodSeconds"]
    worker_env = {e["name"]: e for e in worker["env"]}
    node_drain = float(worker_env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"]["value"])
    assert drain < node_drain < grace


@pytest.mark.parametrize("group", ["head", "gpu"])
def test_pod_templates_validate(group: str) -> None:
    """The pod templates are plain Kubernetes: validated against the bundled schemas
    (strict, as deploy/k8s)."""
    import kubernetes_validate

    template = pod_templates()[group]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": template["spec"]}
    kubernetes_validate.validate(pod, kubernetes_validate.utils.latest_version(), strict=True)


def pod_monitors() -> dict[str, dict[str, Any]]:
    return {m["metadata"]["name"]: m for m in load(RAY / "podmonitor.yaml")}


def selected(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, matchExpressions with In) selects ``labels``."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def test_pod_monitors_scrape_every_replica_and_ray() -> None:
    """The Prometheus Operator's PodMonitors: each replica's own /metrics port on the worker
    pods (under the service's job, as the ServiceMonitor of deploy/k8s), Ray's metrics port on
    every pod; each endpoint names a port that every pod it selects declares."""
    monitors = pod_monitors()
    assert set(monitors) == {"tokenreward-replicas", "tokenreward-ray"}
    templates = pod_templates()
    serve = serve_config()
    cluster = rayservice()["spec"]["rayClusterConfig"]
    for monitor in monitors.values():
        assert (monitor["apiVersion"], monitor["kind"]) == (
            "monitoring.coreos.com/v1",
            "PodMonitor",
        )
        assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
        spec = monitor["spec"]
        assert set(spec) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"}
        pods = [
            t for t in templates.values() if selected(spec["selector"], t["metadata"]["labels"])
        ]
        assert pods, f"{monitor['metadata']['name']} selects no pod of the RayService"
        for endpoint in spec["podMetricsEndpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
            assert endpoint["path"] == "/metrics"
            for field in ("interval", "scrapeTimeout"):
                assert re.fullmatch(r"\d+(ms|s|m|h)", endpoint[field]), endpoint[field]
            for pod in pods:
                (container,) = pod["spec"]["containers"]
                assert endpoint["port"] in {p["name"] for p in container["ports"]}
    replicas = monitors["tokenreward-replicas"]["spec"]
    pods = [
        t for t in templates.values() if selected(replicas["selector"], t["metadata"]["labels"])
    ]
    assert pods == [templates["gpu"]]  # the head holds no replica
    (container,) = templates["gpu"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (endpoint,) = replicas["podMetricsEndpoints"]
    assert ports[endpoint["port"]] == serve["applications"][0]["args"]["metrics_port"]
    # The job is the Service's name under the ServiceMonitor: one job for the dashboard.
    (service,) = load(K8S / "service.yaml")
    assert (
        templates["gpu"]["metadata"]["labels"][replicas["jobLabel"]]
        == (service["metadata"]["name"])
    )
    ray = monitors["tokenreward-ray"]["spec"]
    assert len(
        [t for t in templates.values() if selected(ray["selector"], t["metadata"]["labels"])]
    ) == len(templates)
    (endpoint,) = ray["podMetricsEndpoints"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        (container,) = group["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert str(ports[endpoint["port"]]) == group["rayStartParams"]["metrics-export-port"]


def test_prometheus_config_for_ray_nodes() -> None:
    """deploy/prometheus/ray.yml: valid for promtool, the service's job and intervals of
    prometheus.yml (the dashboard's), and replica targets on serve.yaml's metrics_port and the
    ports after it (one per replica on a node)."""
    check_prometheus_config(RAY_PROMETHEUS_CONFIG)
    config = yaml.safe_load(RAY_PROMETHEUS_CONFIG.read_text())
    local = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["global"] == local["global"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    (service_job,) = local["scrape_configs"]
    replicas = jobs[service_job["job_name"]]
    assert replicas["metrics_path"] == "/metrics"
    metrics_port = serve_config()["applications"][0]["args"]["metrics_port"]
    (targets,) = replicas["static_configs"]
    ports = [urlsplit(f"//{target}").port for target in targets["targets"]]
    assert metrics_port in ports
    assert all(port is not None and 0 <= port - metrics_port < 8 for port in ports), ports
    # Ray's own metrics: the targets that the head node writes for Prometheus.
    (discovery,) = jobs["ray"]["file_sd_configs"]
    assert discovery["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
