"""The compose files, validated offline by docker-compose (Debian's package: its `config`
parses, validates against the Compose schema, merges override files and interpolates
variables without a container engine), then checked for what the stack needs."""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.helpers import (
    DEPLOY,
    PROMETHEUS_CONFIG,
    REPO,
    dashboard_queries,
    load_dashboard,
    require_tool,
    substitute,
)

BASE = REPO / "docker-compose.yml"
GPU = REPO / "docker-compose.gpu.yml"
CI = REPO / "docker-compose.ci.yml"
E2E = DEPLOY / "e2e"

# Variables the compose files read; the tests set them explicitly, never from the caller's shell.
_COMPOSE_VARIABLES = (
    "BASE_IMAGE",
    "WHEELHOUSE",
    "IMAGE_TAG",
    "MODELS_DIR",
    "API_PORT",
    "PROMETHEUS_PORT",
    "GRAFANA_PORT",
    "PROMETHEUS_IMAGE",
    "LOADGEN_RUNS",
)


def compose(
    *args: str, files: tuple[Path, ...] = (BASE,), env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in _COMPOSE_VARIABLES and not k.startswith(("TOKENREWARD_", "COMPOSE_", "DOCKER_"))
    }
    command = [require_tool("docker-compose"), "--project-directory", str(REPO)]
    for file in files:
        command += ["-f", str(file)]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**clean, **(env or {})},
        timeout=60,
        check=False,
    )


def config(
    *files: Path, env: Mapping[str, str] | None = None, profile: str | None = None
) -> dict[str, Any]:
    """The merged, interpolated configuration, as `docker-compose config` prints it."""
    args = ["--profile", profile, "config"] if profile else ["config"]
    result = compose(*args, files=files or (BASE,), env=env)
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = yaml.safe_load(result.stdout)
    return data


def test_the_validator_rejects_an_invalid_file(tmp_path: Path) -> None:
    """docker-compose really validates offline (so the passes below mean something)."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  web:\n    image: x\n    ports: 8000\n    restat: always\n")
    result = compose("config", files=(broken,))
    assert result.returncode != 0
    assert "restat" in result.stderr or "ports" in result.stderr, result.stderr


def test_stack_services_and_mounts() -> None:
    services = config()["services"]
    assert {"tokenreward", "prometheus", "grafana", "loadgen"} <= set(services)
    server = services["tokenreward"]
    assert server["build"]["context"] == str(REPO)
    assert server["build"]["args"]["BASE_IMAGE"] == "python:3.11-slim"
    assert (REPO / server["build"]["args"]["WHEELHOUSE"]).is_dir()
    assert server["command"] == ["--host", "0.0.0.0", "--port", "8000"]
    assert "127.0.0.1:8000:8000/tcp" in server["ports"]
    assert "models:/models:ro" in server["volumes"]
    assert "deploy" not in server, "the base stack runs on the CPU; GPUs come from the override"
    # Unset in the shell, a passed-through variable stays unset in the container (null here):
    # an empty TOKENREWARD_MODEL would be an invalid model path.
    assert server["environment"]["TOKENREWARD_MODEL"] is None
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith("/"):
                assert Path(source).exists(), f"{name} mounts {source}, which does not exist"


def test_prometheus_scrapes_the_service() -> None:
    services = config()["services"]
    mounts = services["prometheus"]["volumes"]
    assert f"{PROMETHEUS_CONFIG}:/etc/prometheus/prometheus.yml:ro" in mounts
    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    targets = [t for job in scrape for static in job["static_configs"] for t in static["targets"]]
    command = services["tokenreward"]["command"]
    assert targets == [f"tokenreward:{command[command.index('--port') + 1]}"]


def test_grafana_is_provisioned() -> None:
    grafana = config()["services"]["grafana"]
    mounts = grafana["volumes"]
    assert f"{DEPLOY / 'grafana/provisioning'}:/etc/grafana/provisioning:ro" in mounts
    assert f"{DEPLOY / 'grafana/dashboards'}:/var/lib/grafana/dashboards:ro" in mounts
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DEPLOY / "grafana/dashboards" / Path(home).name).is_file()


def test_loadgen_profile_drives_the_service() -> None:
    services = config(profile="loadgen")["services"]
    loadgen = services["loadgen"]
    assert loadgen["profiles"] == ["loadgen"]
    assert loadgen["image"] == services["tokenreward"]["image"]
    assert loadgen["depends_on"] == {"tokenreward": {"condition": "service_healthy"}}
    assert loadgen["healthcheck"] == {"test": ["NONE"]}
    (script,) = loadgen["command"]
    # docker-compose prints the file's `$$` (a literal `$` for the shell) as it was written.
    script = script.replace("$$", "$")
    assert "exec tokenreward bench --url http://tokenreward:8000 --workload mixed --runs 100" in (
        " ".join(script.split())
    )
    assert loadgen["entrypoint"] == ["/bin/sh", "-c"]


@pytest.mark.parametrize(
    ("keys", "expected"),
    [(None, []), ("first-key-123,second-key-456", ["--api-key", "first-key-123"])],
)
def test_loadgen_sends_the_first_api_key(
    tmp_path: Path, keys: str | None, expected: list[str]
) -> None:
    """The load generator's shell line, run with a stand-in `tokenreward` that prints its
    arguments."""
    (script,) = config(profile="loadgen")["services"]["loadgen"]["command"]
    stub = tmp_path / "tokenreward"
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    if keys is not None:
        env["TOKENREWARD_API_KEYS"] = keys
    result = subprocess.run(
        ["/bin/sh", "-c", script.replace("$$", "$")],
        capture_output=True,
        text=True,
        env=env,
        timeout=10,
        check=True,
    )
    bench = ["bench", "--url", "http://tokenreward:8000", "--workload", "mixed", "--runs", "100"]
    assert result.stdout.split() == [*bench, *expected]


def test_gpu_override_reserves_one_nvidia_device() -> None:
    server = config(BASE, GPU)["services"]["tokenreward"]
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert server["environment"]["TOKENREWARD_DEVICE"] == "cuda"
    # Everything else of the base service is kept.
    assert server["command"] == config()["services"]["tokenreward"]["command"]


def test_variables_choose_the_model_and_the_base_image() -> None:
    env = {
        "MODELS_DIR": "/srv/reward-models",
        "TOKENREWARD_MODEL": "/models/my-rm",
        "BASE_IMAGE": "registry.local/python:3.11",
        "API_PORT": "9000",
    }
    server = config(env=env)["services"]["tokenreward"]
    assert "/srv/reward-models:/models:ro" in server["volumes"]
    assert server["environment"]["TOKENREWARD_MODEL"] == "/models/my-rm"
    assert server["build"]["args"]["BASE_IMAGE"] == "registry.local/python:3.11"
    assert "127.0.0.1:9000:8000/tcp" in server["ports"]


def test_ci_override_runs_everything_on_loopback_with_host_networking() -> None:
    services = config(BASE, CI, profile="loadgen")["services"]
    for name, service in services.items():
        assert service["network_mode"] == "host", name
    # Host networking: each service binds loopback itself, and the names the configuration
    # uses resolve to it.
    assert services["tokenreward"]["command"] == ["--host", "127.0.0.1", "--port", "8000"]
    assert "--web.listen-address=127.0.0.1:9090" in services["prometheus"]["command"]
    assert services["prometheus"]["extra_hosts"] in (
        ["tokenreward:127.0.0.1"],
        {"tokenreward": "127.0.0.1"},
    )
    assert services["grafana"]["environment"]["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"
    # No local Grafana image on CI machines: it only starts when asked for.
    assert services["grafana"]["profiles"] == ["grafana"]
    assert services["loadgen"]["depends_on"] == {"tokenreward": {"condition": "service_started"}}
    assert services["prometheus"]["image"] == "localhost/tokenreward-e2e-prometheus:latest"


def test_e2e_dashboard_check_reads_the_same_expressions() -> None:
    """deploy/e2e/check_dashboard.py (standard library only) finds the same expressions as
    these tests, and substitutes the variables the same way."""
    spec = importlib.util.spec_from_file_location("check_dashboard", E2E / "check_dashboard.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    found = module.expressions(load_dashboard())
    assert [(where, expr) for where, expr in found] == [
        (q.where, q.expr) for q in dashboard_queries()
    ]
    assert [module.substitute(expr) for _, expr in found] == [
        substitute(q.expr) for q in dashboard_queries()
    ]
