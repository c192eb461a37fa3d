"""The Kubernetes manifests: schema validation of the built-in kinds with kubernetes-validate
(offline, against the schemas it bundles, strict: unknown fields are errors), a structural
check of the ServiceMonitor (a CRD, which has no bundled schema), the kustomization rendered
in Python and, where kubectl is installed, by kustomize itself, and the references between the
objects and to the image."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.helpers import K8S, dockerfile_instructions
from tokenreward_service.config import Settings
from tokenreward_service.metrics import Metrics

try:
    import kubernetes_validate
except ImportError:  # pragma: no cover - the failure below says what to do
    kubernetes_validate = None

# The oldest Kubernetes these manifests target, and the newest the validator knows.
K8S_VERSIONS = ("1.27.0", "latest")
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
"""Custom resources: no bundled schema; checked structurally below."""


def _validator() -> Any:
    if kubernetes_validate is None:
        pytest.fail(
            "kubernetes-validate is not installed; install it with: "
            ".venv/bin/pip install kubernetes-validate",
            pytrace=False,
        )
    return kubernetes_validate


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def validate(resource: dict[str, Any], version: str) -> None:
    validator = _validator()
    if version == "latest":
        version = validator.utils.latest_version()
    validator.validate(resource, version, strict=True)


def kustomization() -> dict[str, Any]:
    (data,) = load(K8S / "kustomization.yaml")
    return data


def render() -> list[dict[str, Any]]:
    """What `kustomize build deploy/k8s` makes of the features this kustomization uses
    (resources, labels without selectors, images)."""
    spec = kustomization()
    known = {"apiVersion", "kind", "resources", "labels", "images", "namespace"}
    assert set(spec) <= known, f"features the Python rendering does not know: {set(spec) - known}"
    out = []
    for name in spec["resources"]:
        path = K8S / name
        assert path.is_file(), f"kustomization lists {name}, which does not exist"
        out += load(path)
    for group in spec.get("labels", []):
        assert not group.get("includeSelectors")
        assert not group.get("includeTemplates")
        for resource in out:
            resource["metadata"].setdefault("labels", {}).update(group["pairs"])
    for image in spec.get("images", []):
        for resource in out:
            for container in _containers(resource):
                repository = container["image"].split(":", 1)[0]
                if repository == image["name"]:
                    repository = image.get("newName", repository)
                    container["image"] = f"{repository}:{image['newTag']}"
    if "namespace" in spec:
        for resource in out:
            resource["metadata"]["namespace"] = spec["namespace"]
    return out


def _containers(resource: dict[str, Any]) -> list[dict[str, Any]]:
    if resource["kind"] != "Deployment":
        return []
    containers: list[dict[str, Any]] = resource["spec"]["template"]["spec"]["containers"]
    return containers


def by_kind(resources: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [r for r in resources if r["kind"] == kind]
    return found


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", manifests(), ids=lambda p: p.name)
def test_manifest_validates(path: Path, version: str) -> None:
    for resource in load(path):
        if (resource["apiVersion"], resource["kind"]) in CRD_KINDS:
            continue  # test_service_monitor
        validate(resource, version)


def test_the_validator_rejects_an_invalid_manifest() -> None:
    """The validation is real: a typo and a wrong type are both refused."""
    validator = _validator()
    (deployment,) = load(K8S / "deployment.yaml")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["periodSecond"] = 5  # typo of periodSeconds
    with pytest.raises(validator.ValidationError):
        validate(deployment, "latest")
    (deployment,) = load(K8S / "deployment.yaml")
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(validator.ValidationError):
        validate(deployment, "latest")


def test_kustomization_renders() -> None:
    resources = render()
    kinds = sorted(r["kind"] for r in resources)
    assert kinds == sorted(
        [
            "Deployment",
            "HorizontalPodAutoscaler",
            "PersistentVolumeClaim",
            "Service",
            "ServiceMonitor",
        ]
    )
    names = [(r["kind"], r["metadata"]["name"]) for r in resources]
    assert len(names) == len(set(names))
    for resource in resources:
        assert resource["metadata"]["labels"]["app.kubernetes.io/part-of"] == "tokenreward"
        if (resource["apiVersion"], resource["kind"]) not in CRD_KINDS:
            validate(resource, "latest")
    (container,) = _containers(by_kind(resources, "Deployment"))
    assert re.fullmatch(r"tokenreward:\d+\.\d+\.\d+", container["image"])
    # The example Secret is documentation, never applied with real-looking keys.
    assert "secret.example.yaml" not in kustomization()["resources"]


def test_kubectl_kustomize_agrees() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; test_kustomization_renders covers the rendering")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    def key(resources: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return sorted((r["kind"], r["metadata"]["name"]) for r in resources)

    assert key(built) == key(render())
    assert _containers(by_kind(built, "Deployment")) == _containers(by_kind(render(), "Deployment"))


def test_service_monitor() -> None:
    resources = render()
    monitor = by_kind(resources, "ServiceMonitor")
    service = by_kind(resources, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"
        for field in ("interval", "scrapeTimeout"):
            assert re.fullmatch(r"\d+(ms|s|m|h)", endpoint[field]), endpoint[field]


def test_deployment_wiring() -> None:
    resources = render()
    deployment = by_kind(resources, "Deployment")
    service = by_kind(resources, "Service")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in ports
    args = container["args"]
    assert ports["http"] == int(args[args.index("--port") + 1])
    # One GPU.
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # Weights from the claim, read-only, where TOKENREWARD_MODEL points.
    env = {e["name"]: e for e in container["env"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    (models,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/models"]
    assert models["readOnly"] is True
    claim = volumes[models["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == by_kind(resources, "PersistentVolumeClaim")["metadata"]["name"]
    assert env["TOKENREWARD_MODEL"]["value"].startswith("/models/")
    # Keys from the Secret whose shape secret.example.yaml shows.
    (secret,) = load(K8S / "secret.example.yaml")
    reference = env["TOKENREWARD_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert reference["name"] == secret["metadata"]["name"]
    assert reference["key"] in secret["stringData"]
    Settings(api_keys=secret["stringData"][reference["key"]])  # the server accepts the shape
    # The user of the image, and a read-only root with a writable /tmp.
    user = next(i.args for i in dockerfile_instructions() if i.keyword == "USER")
    assert str(pod["spec"]["securityContext"]["runAsUser"]) == user.split(":")[0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])


def test_probes_and_graceful_termination() -> None:
    deployment = by_kind(render(), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # Liveness: /healthz, which never needs a key.
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    # Readiness: /readyz, which never needs a key either (probes carry none).
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Removed from the endpoints first (preStop), then SIGTERM and a drain of queued work for up
    # to the request timeout, all inside the grace period.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = Settings().shutdown_delay_s + Settings().request_timeout_s
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + drain


def test_autoscaler_scales_the_deployment_on_an_exported_metric() -> None:
    resources = render()
    hpa = by_kind(resources, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "tokenreward")
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    registry = CollectorRegistry()
    Metrics(registry)
    text = generate_latest(registry).decode()
    exported = {family.name for family in text_string_to_metric_families(text)}
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "Pods":
            assert metric["pods"]["metric"]["name"] in exported
