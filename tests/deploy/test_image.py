"""The container image's recipe (Dockerfile, .dockerignore) read statically, and its health
check script run for real against a live server (with and without API keys)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.deploy.helpers import (
    HEALTHCHECK,
    REPO,
    Instruction,
    dockerfile_instructions,
    in_build_context,
)
from tests.support import LiveServer, free_port
from tokenreward_service.config import Settings
from tokenreward_service.model import RewardModel

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the project's tests run on 3.11
    import tomli as tomllib

KEY = "test-key-0123456789"


def stage_of(instructions: list[Instruction], keyword: str, stage: int = -1) -> list[str]:
    last = max(i.stage for i in instructions) if stage == -1 else stage
    return [i.args for i in instructions if i.keyword == keyword and i.stage == last]


def test_base_image_is_a_build_argument_and_the_build_has_stages() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == Instruction("ARG", "BASE_IMAGE=python:3.11-slim", -1)
    froms = [i.args for i in instructions if i.keyword == "FROM"]
    assert froms == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE} AS runtime"]
    builder = " ".join(i.args for i in instructions if i.stage == 0 and i.keyword == "RUN")
    runtime = " ".join(stage_of(instructions, "RUN"))
    # Wheels are built in the builder; the runtime installs them from it and builds nothing.
    assert "pip wheel --wheel-dir /wheels" in builder
    assert "--mount=type=bind,from=builder,source=/wheels,target=/wheels" in runtime
    assert "pip install --no-index --find-links /wheels" in runtime
    for tool in ("pip wheel", "apt-get", "gcc", "build-essential"):
        assert tool not in runtime, f"the runtime stage runs {tool}"


def test_torch_and_the_server_extra_are_installed() -> None:
    instructions = dockerfile_instructions()
    assert "TORCH_VERSION=2.13.0" in [i.args for i in instructions if i.keyword == "ARG"]
    builder = " ".join(i.args for i in instructions if i.stage == 0 and i.keyword == "RUN")
    assert '"torch==${TORCH_VERSION}" ".[server]"' in builder
    runtime = " ".join(stage_of(instructions, "RUN"))
    assert '"torch==${TORCH_VERSION}" "tokenreward[server]"' in runtime
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "server" in extras["optional-dependencies"]
    assert extras["name"] == "tokenreward"


def test_a_wheelhouse_makes_the_build_offline() -> None:
    instructions = dockerfile_instructions()
    args = [i.args for i in instructions if i.keyword == "ARG" and i.stage == 0]
    (default,) = [a.split("=", 1)[1] for a in args if a.startswith("WHEELHOUSE=")]
    assert (REPO / default).is_dir()
    assert in_build_context(f"{default}/torch-2.13.0-cp311-none-linux_x86_64.whl")
    assert in_build_context("wheelhouse/torch-2.13.0-cp311-none-linux_x86_64.whl")
    assert "${WHEELHOUSE}/ /wheelhouse/" in stage_of(instructions, "COPY", stage=0)
    builder = " ".join(i.args for i in instructions if i.stage == 0 and i.keyword == "RUN")
    assert "if ls /wheelhouse/*.whl" in builder
    assert "PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse" in builder


def test_the_runtime_install_is_rebuilt_whenever_a_wheel_changes() -> None:
    # Buildah (Podman) caches a RUN whose only input from the builder is a bind mount without
    # looking at the mounted files, so a rebuild after a source change kept the old package. A
    # COPY of the wheels' checksums in front of it ties that layer to the wheels' content.
    instructions = dockerfile_instructions()
    builder = " ".join(i.args for i in instructions if i.stage == 0 and i.keyword == "RUN")
    assert "sha256sum -- *.whl >SHA256SUMS" in builder
    runtime = [i for i in instructions if i.stage == 1]
    (install,) = [
        n for n, i in enumerate(runtime) if i.keyword == "RUN" and "from=builder" in i.args
    ]
    copies = [
        n
        for n, i in enumerate(runtime)
        if i.keyword == "COPY" and i.args.startswith("--from=builder /wheels/SHA256SUMS ")
    ]
    assert copies
    assert copies[0] < install


def test_runtime_is_the_program_run_by_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    (entrypoint,) = stage_of(instructions, "ENTRYPOINT")
    assert json.loads(entrypoint) == ["tokenreward", "serve"]
    (cmd,) = stage_of(instructions, "CMD")
    assert json.loads(cmd) == ["--host", "0.0.0.0", "--port", "8000"]
    assert stage_of(instructions, "EXPOSE") == ["8000"]
    (user,) = stage_of(instructions, "USER")
    uid, _, gid = user.partition(":")
    assert int(uid) > 0
    assert int(gid) > 0
    runtime = " ".join(stage_of(instructions, "RUN"))
    assert f"--uid {uid}" in runtime
    # USER comes after every RUN that needs root.
    last = [i for i in instructions if i.stage == instructions[-1].stage]
    user_at = next(n for n, i in enumerate(last) if i.keyword == "USER")
    assert all(i.keyword != "RUN" for i in last[user_at:])


def test_healthcheck_runs_the_script_the_image_copies() -> None:
    instructions = dockerfile_instructions()
    (healthcheck,) = stage_of(instructions, "HEALTHCHECK")
    copies = stage_of(instructions, "COPY")
    source = f"{HEALTHCHECK.relative_to(REPO)}"
    (copy,) = [c for c in copies if c.startswith(source)]
    destination = copy.split()[-1]
    assert healthcheck.endswith(f'CMD ["python3", "{destination}"]')
    assert "curl" not in healthcheck


def test_everything_copied_exists_and_is_in_the_build_context() -> None:
    instructions = dockerfile_instructions()
    sources = []
    for instruction in instructions:
        if instruction.keyword != "COPY" or "--from" in instruction.args:
            continue
        sources += [s for s in instruction.args.split()[:-1] if not s.startswith("${")]
    assert sources
    for source in sources:
        path = REPO / source
        assert path.exists(), f"COPY {source}: no such path"
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        files = [f for f in files if "__pycache__" not in f.parts and ".egg-info" not in str(f)]
        assert files, source
        for file in files:
            relative = str(file.relative_to(REPO))
            assert in_build_context(relative), f"{relative} is excluded by .dockerignore"
    # The package sources the build needs, from pyproject.toml.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = [
        *project["tool"]["setuptools"]["packages"]["find"]["where"],
        project["project"]["readme"],
    ]
    assert {n.rstrip("/") for n in needed} <= {s.rstrip("/") for s in sources}


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "build/lib/x.py",
        "service/tokenreward_service/__pycache__/app.cpython-311.pyc",
        "deploy/k8s/deployment.yaml",
        ".env",
    ],
)
def test_dockerignore_keeps_out(path: str) -> None:
    assert not in_build_context(path)


# ---------------------------------------------------------------------------------------------
# The health check script (Docker HEALTHCHECK and the Kubernetes readiness probe)


@pytest.fixture(scope="module")
def healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tokenreward_healthcheck", HEALTHCHECK)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def open_server(llama: RewardModel) -> Iterator[LiveServer]:
    with LiveServer(Settings(), model=llama) as server:
        yield server


@pytest.fixture(scope="module")
def keyed_server(llama: RewardModel) -> Iterator[LiveServer]:
    with LiveServer(Settings(api_keys=["another-key-abcdef", KEY]), model=llama) as server:
        yield server


def _port(server: LiveServer) -> str:
    return server.url.rsplit(":", 1)[1]


def test_probe_request_reads_flags_then_environment(healthcheck: ModuleType) -> None:
    request = healthcheck.probe_request([], {})
    assert request.full_url == "http://127.0.0.1:8000/readyz"
    assert request.get_header("Authorization") is None
    env = {"TOKENREWARD_PORT": "9001", "TOKENREWARD_API_KEYS": " k1-abcdefgh , k2-abcdefgh"}
    request = healthcheck.probe_request([], env)
    assert request.full_url == "http://127.0.0.1:9001/readyz"
    assert request.get_header("Authorization") == "Bearer k1-abcdefgh"
    args = ["tokenreward", "serve", "--port", "9100", "--host=::", "--api-keys", "flag-key-1"]
    request = healthcheck.probe_request(args, env)
    assert request.full_url == "http://127.0.0.1:9100/readyz"
    assert request.get_header("Authorization") == "Bearer flag-key-1"
    request = healthcheck.probe_request(["--host", "fd00::5", "--port=1"], {})
    assert request.full_url == "http://[fd00::5]:1/readyz"


def test_server_args_only_from_a_tokenreward_server(
    healthcheck: ModuleType, tmp_path: Path
) -> None:
    cmdline = tmp_path / "cmdline"
    argv = [
        "/opt/tokenreward/bin/python3",
        "/opt/tokenreward/bin/tokenreward",
        "serve",
        "--port",
        "8000",
    ]
    cmdline.write_bytes("\0".join(argv).encode() + b"\0")
    assert healthcheck.server_args(cmdline)[:5] == argv
    cmdline.write_bytes(b"/sbin/init\0--port\x009\0")
    assert healthcheck.server_args(cmdline) == []
    assert healthcheck.server_args(tmp_path / "missing") == []


def test_ready_server_without_keys(healthcheck: ModuleType, open_server: LiveServer) -> None:
    assert healthcheck.main([], {"TOKENREWARD_PORT": _port(open_server)}) == 0


def test_keyed_server_is_ready_whatever_key_the_probe_has(
    healthcheck: ModuleType, keyed_server: LiveServer
) -> None:
    """/readyz is a probe: it needs no key, and a key sent along does not matter."""
    port = _port(keyed_server)
    assert healthcheck.main([], {"TOKENREWARD_PORT": port}) == 0
    assert (
        healthcheck.main([], {"TOKENREWARD_PORT": port, "TOKENREWARD_API_KEYS": "wrong-key-1"}) == 0
    )
    keys = f"{KEY},another-key-abcdef"
    assert healthcheck.main([], {"TOKENREWARD_PORT": port, "TOKENREWARD_API_KEYS": keys}) == 0
    assert healthcheck.main(["tokenreward", "serve", "--port", port, "--api-keys", KEY], {}) == 0


def test_nothing_listening_is_not_ready(healthcheck: ModuleType) -> None:
    assert healthcheck.main([], {"TOKENREWARD_PORT": str(free_port())}, timeout_s=2) == 1


def test_script_as_the_container_runs_it(keyed_server: LiveServer) -> None:
    """A fresh interpreter, as Docker starts it; only the standard library."""
    env = {
        "TOKENREWARD_PORT": _port(keyed_server),
        "TOKENREWARD_API_KEYS": KEY,
        "PATH": "/usr/bin:/bin",
    }

    def probe() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-I", str(HEALTHCHECK)],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=False,
        )

    result = probe()
    assert result.returncode == 0, result.stderr
    env["TOKENREWARD_API_KEYS"] = "wrong-key-1"
    assert probe().returncode == 0, "/readyz needs no key"
    env["TOKENREWARD_PORT"] = str(free_port())  # nothing listening there: not ready
    assert probe().returncode == 1
