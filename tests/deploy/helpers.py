"""Shared by the deployment tests: paths, required tools, the dashboard's queries, a real
Prometheus to run them against, Dockerfile and .dockerignore reading."""

from __future__ import annotations

import fnmatch
import json
import math
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support import free_port

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tokenreward.json"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RAY_PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "ray.yml"
K8S = DEPLOY / "k8s"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"

# How to get each outside tool; the project's CI installs them, so a missing one is a failure.
INSTALL = {
    "prometheus": "apt-get install -y prometheus  (Debian; installs /usr/bin/prometheus)",
    "promtool": "apt-get install -y prometheus  (Debian; installs /usr/bin/promtool)",
    "docker-compose": "apt-get install -y docker-compose  (Debian; `config` needs no engine)",
}


def require_tool(name: str) -> str:
    """The path of an installed command, or a failure saying how to install it."""
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/bin") / name, Path("/usr/local/bin") / name) if p.is_file()),
        None,
    )
    if found is None:
        pytest.fail(f"`{name}` is not installed; install it with: {INSTALL[name]}", pytrace=False)
    return found


def check_prometheus_config(path: Path) -> None:
    """``promtool check config`` passes on ``path`` (Prometheus's own validation)."""
    result = subprocess.run(
        [require_tool("promtool"), "check", "config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# The dashboard


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


@dataclass(frozen=True)
class Query:
    where: str
    """``panel title / refId`` or ``variable name``: where the expression is in the dashboard."""
    expr: str
    """As written in the dashboard, Grafana variables included."""
    instant: bool = False


def dashboard_queries(dashboard: dict[str, Any] | None = None) -> list[Query]:
    """Every PromQL expression of the dashboard: panel targets and query variables."""
    dashboard = dashboard if dashboard is not None else load_dashboard()
    queries = []
    for panel in iter_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            queries.append(
                Query(
                    f"{panel['title']} / {target['refId']}",
                    target["expr"],
                    bool(target.get("instant", False)),
                )
            )
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable["type"] == "query":
            definition = variable["definition"]
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", definition)
            assert match, f"variable {variable['name']}: unexpected query {definition!r}"
            # label_values(SELECTOR, LABEL) is Grafana's, not PromQL: its series come from
            # SELECTOR, which must be valid PromQL with data.
            queries.append(Query(f"variable {variable['name']}", match.group(1), True))
    return queries


# What Grafana substitutes, and what the tests put in its place: "All" replicas, and a rate
# window that covers the whole test.
VARIABLE_VALUES = {"__rate_interval": "1m", "__interval": "15s", "instance": ".*"}


def substitute(expr: str) -> str:
    """``expr`` with every Grafana variable replaced; an unknown variable is an error."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in VARIABLE_VALUES:
            raise AssertionError(f"unknown Grafana variable ${name} in {expr!r}")
        return VARIABLE_VALUES[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)


METRIC_NAME = re.compile(r"\b((?:tokenreward|process)_[a-zA-Z0-9_]+)\b")


def metric_names(expr: str) -> set[str]:
    """The tokenreward_* and process_* series names an expression reads."""
    return set(METRIC_NAME.findall(expr))


# ---------------------------------------------------------------------------------------------
# A real Prometheus


@contextmanager
def prometheus(
    folder: Path, targets: Sequence[str], config: Path = PROMETHEUS_CONFIG
) -> Iterator[str]:
    """Debian's ``prometheus`` on a free port of 127.0.0.1, yielding its URL; stopped at the end.

    It runs a shipped scrape configuration, ``config``, with its ``tokenreward`` job pointed at
    ``targets`` (host:port) and every interval cut to 1 s, so that a test waits for scrapes
    seconds, not minutes; the configuration's other jobs are dropped (their targets are not on
    this machine). Its files (configuration, data, log) go in ``folder``.
    """
    binary = require_tool("prometheus")
    settings = yaml.safe_load(config.read_text())
    settings["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    (job,) = [c for c in settings["scrape_configs"] if c["job_name"] == "tokenreward"]
    job["static_configs"] = [{"targets": list(targets)}]
    settings["scrape_configs"] = [job]
    (folder / "prometheus.yml").write_text(yaml.safe_dump(settings))
    listen = f"127.0.0.1:{free_port()}"
    base = f"http://{listen}"
    log = folder / "prometheus.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address={listen}",
                "--log.level=warn",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=folder,
        )
    try:
        _wait_ready(base, proc, log)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{base}/-/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"prometheus did not become ready:\n{log.read_text()}")


def prom_query(base: str, expr: str, at: float | None = None) -> dict[str, Any]:
    """An instant query through Prometheus's HTTP API, at ``at`` (Unix time; now when None):
    the answer's JSON, an error included (400 for an expression that does not parse)."""
    params = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    response = httpx.get(f"{base}/api/v1/query", params=params, timeout=10)
    body: dict[str, Any] = response.json()
    return body


def wait_for_scrape_after(
    base: str, instance: str, after: float, deadline_s: float = 20.0
) -> float:
    """Wait until Prometheus stored a scrape of ``instance`` that started after ``after``;
    return that scrape's timestamp."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        # The raw samples of `up`: their timestamps are the scrapes' (timestamp() of an
        # expression other than a plain selector gives the evaluation time instead).
        body = prom_query(base, f'up{{job="tokenreward", instance="{instance}"}}[30s]')
        results = body.get("data", {}).get("result", [])
        if results:
            stamp, value = results[0]["values"][-1]
            if float(stamp) > after and value == "1":
                return float(stamp)
        time.sleep(0.2)
    raise AssertionError(f"Prometheus did not scrape {instance} within {deadline_s} s")


def check_dashboard_query(base: str, query: Query, at: float) -> list[float]:
    """Evaluate a dashboard expression at ``at``, as Grafana would (variables substituted): it
    must parse and return data, every value finite (a histogram whose buckets did not grow
    inside the rate window gives NaN, a panel with nothing to draw). Returns the values."""
    expr = substitute(query.expr)
    body = prom_query(base, expr, at=at)
    assert body["status"] == "success", f"{query.where}: {expr}\n{body}"
    data = body["data"]
    assert data["resultType"] in ("vector", "matrix"), data
    assert data["result"], f"{query.where}: no data for {expr}"
    values = [float(r["value"][1]) for r in data["result"]]
    assert all(math.isfinite(v) for v in values), f"{query.where}: {expr} gave {values}"
    return values


# ---------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int
    """Index of the build stage (-1: before the first FROM)."""


def dockerfile_instructions(path: Path = REPO / "Dockerfile") -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, " ".join(args.split()), stage))
    assert not pending, "the Dockerfile ends in a continuation line"
    return out


def dockerignore_patterns(path: Path = REPO / ".dockerignore") -> list[tuple[bool, str]]:
    """(is an exception ``!``, pattern) in file order."""
    out = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        out.append((negated, line.lstrip("!").strip("/")))
    return out


def _pattern_matches(pattern: str, path: str) -> bool:
    if "**" in pattern:
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        return re.fullmatch(regex, path) is not None
    return fnmatch.fnmatchcase(path, pattern) and path.count("/") == pattern.count("/")


def in_build_context(relative: str, patterns: list[tuple[bool, str]] | None = None) -> bool:
    """Whether Docker sends ``relative`` (a path in the repository) with the build context:
    the last pattern matching the path or one of its parent folders decides."""
    patterns = patterns if patterns is not None else dockerignore_patterns()
    parts = relative.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negated, pattern in patterns:
        if any(_pattern_matches(pattern, candidate) for candidate in candidates):
            included = negated
    return included
