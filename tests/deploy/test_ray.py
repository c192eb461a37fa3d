"""deploy/ray: the Serve config and the KubeRay RayService that embeds it.

A RayService is a custom resource, which kubernetes-validate has no schema for: its structure
is checked here, and its pod templates are validated as real Kubernetes PodTemplateSpecs. Ray
Serve's own schema (ServeDeploySchema) validates both Serve configs in
tests/integrations/test_ray_serve.py, which needs Ray's environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.helpers import DEPLOY
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
    # The pod outlives the replica's drain.
    drain = the_deployment(serve)["graceful_shutdown_timeout_s"]
    assert templates["gpu"]["spec"]["terminationGracePeriodSeconds"] > drain


@pytest.mark.parametrize("group", ["head", "gpu"])
def test_pod_templates_validate(group: str) -> None:
    """The pod templates are plain Kubernetes: validated against the bundled schemas
    (strict, as deploy/k8s)."""
    import kubernetes_validate

    template = pod_templates()[group]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": template["spec"]}
    kubernetes_validate.validate(pod, kubernetes_validate.utils.latest_version(), strict=True)
