"""The Ray image (deploy/ray/Containerfile) read statically, and the one Ray version that the
image, the RayService and the integration tests' Ray environment share.

`make e2e` (deploy/e2e/run.sh, steps ray-build and ray) builds the image and runs it as KubeRay
runs a head node; these checks need no container engine.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import yaml

from tests.deploy.helpers import DEPLOY, REPO, dockerfile_instructions, in_build_context

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the project's tests run on 3.11
    import tomli as tomllib

CONTAINERFILE = DEPLOY / "ray" / "Containerfile"
RAYSERVICE = DEPLOY / "ray" / "rayservice.yaml"
PROXY_CALLBACK = "tokenreward_service.ray_serve:proxy_middlewares"


def project() -> dict[str, Any]:
    data: dict[str, Any] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return data


def ray_pin() -> str:
    """The version of the `ray` extra's ``ray[serve]==X``."""
    (requirement,) = [r for r in project()["optional-dependencies"]["ray"] if r.startswith("ray[")]
    match = re.fullmatch(r"ray\[serve\]==([\d.]+)", requirement)
    assert match, requirement
    return match.group(1)


def containers() -> list[dict[str, Any]]:
    (resource,) = [d for d in yaml.safe_load_all(RAYSERVICE.read_text()) if d]
    cluster = resource["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]]
    templates += [group["template"] for group in cluster["workerGroupSpecs"]]
    return [c for t in templates for c in t["spec"]["containers"]]


def test_one_ray_version_everywhere() -> None:
    version = ray_pin()
    (resource,) = [d for d in yaml.safe_load_all(RAYSERVICE.read_text()) if d]
    assert resource["spec"]["rayClusterConfig"]["rayVersion"] == version
    env = (REPO / "tests" / "integrations" / "envs" / "ray.txt").read_text()
    assert re.findall(r"^ray\[serve\]==(\S+)$", env, flags=re.M) == [version]
    readme = (REPO / "README.md").read_text()
    assert set(re.findall(r"ray\[serve\]==([\d.]*\d)", readme)) <= {version}


def test_the_rayservice_runs_this_image() -> None:
    for container in containers():
        assert container["image"] == f"tokenreward-ray:{project()['version']}"


def test_built_from_the_server_image_with_the_ray_extra() -> None:
    instructions = dockerfile_instructions(CONTAINERFILE)
    assert instructions[0].keyword == "ARG"
    assert instructions[0].args == f"IMAGE=tokenreward:{project()['version']}"
    assert [i.args for i in instructions if i.keyword == "FROM"] == ["${IMAGE}"]
    run = " ".join(i.args for i in instructions if i.keyword == "RUN")
    assert '/opt/tokenreward/bin/pip install "tokenreward[server,ray]"' in run
    # The same wheelhouse convention as the Dockerfile: offline when it holds wheels.
    (wheelhouse,) = [i.args for i in instructions if i.args.startswith("WHEELHOUSE=")]
    server = [i.args for i in dockerfile_instructions() if i.args.startswith("WHEELHOUSE=")]
    assert [wheelhouse] == server
    assert "--mount=type=bind,source=${WHEELHOUSE},target=/wheelhouse" in run
    assert "PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse" in run
    assert in_build_context(f"{wheelhouse.split('=', 1)[1]}/ray-2.60.0-cp311-linux.whl")


def test_runs_as_kuberay_runs_it() -> None:
    instructions = dockerfile_instructions(CONTAINERFILE)
    run = " ".join(i.args for i in instructions if i.keyword == "RUN")
    # KubeRay's command is bash, -lc where the operator asks for a login shell; Debian's
    # /etc/profile resets PATH, so the environment's bin folder is put back for login shells.
    assert "/etc/profile.d/tokenreward.sh" in run
    assert 'PATH="/opt/tokenreward/bin:$PATH"' in run
    assert "bash -lc 'ray --version" in run
    assert "ray kuberay-autoscaler --help" in run  # the autoscaler sidecar runs this image
    env: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            for pair in instruction.args.split():
                key, _, value = pair.partition("=")
                env[key] = value
    assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == PROXY_CALLBACK
    for container in containers():  # the manifest sets it too, for any image
        assert {"name": "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "value": PROXY_CALLBACK} in (
            container["env"]
        )
    # Not the server's program, health check or root.
    last = {i.keyword: i.args for i in instructions}
    assert last["ENTRYPOINT"] == "[]"
    assert last["HEALTHCHECK"] == "NONE"
    uid, _, gid = last["USER"].partition(":")
    assert int(uid) > 0
    assert int(gid) > 0
    user_at = max(n for n, i in enumerate(instructions) if i.keyword == "USER")
    assert all(i.keyword != "RUN" for i in instructions[user_at:])
