"""The Grafana dashboard against a real Prometheus scraping a real tokenreward server.

Prometheus (Debian's package) runs on 127.0.0.1 with the shipped scrape configuration, its
target and interval changed for the test. Traffic of every kind the dashboard shows (valid
requests, shared prompts, invalid requests, unknown routes) goes in two phases with a scrape
after each, so every counter has increased inside the rate window. Then every PromQL
expression of the dashboard is evaluated through Prometheus's HTTP API: each must parse and
return finite data.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import torch
import yaml
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.helpers import (
    DASHBOARD,
    DEPLOY,
    PROMETHEUS_CONFIG,
    REPO,
    Query,
    check_dashboard_query,
    check_prometheus_config,
    dashboard_queries,
    iter_panels,
    load_dashboard,
    metric_names,
    prom_query,
    prometheus,
    substitute,
    wait_for_scrape_after,
)
from tests.support import LiveServer
from tokenreward_service.config import Settings
from tokenreward_service.metrics import Metrics
from tokenreward_service.model import RewardModel

QUERIES = dashboard_queries()


@dataclass
class Stack:
    server: LiveServer
    gpu_replica: str
    """host:port of the simulated GPU replica."""
    prometheus: str
    eval_time: float
    """A time just after the scrape that followed the last traffic: queries evaluate there."""
    exported: set[str]
    """Sample names on the server's /metrics after the traffic."""


def _traffic(url: str, vocab: int, seed: int) -> None:
    """Valid requests of mixed lengths, GRPO-style groups (shared prompts), and invalid ones."""
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(n)]

    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(4):
            items = [
                {"prompt_ids": ids(rng.randint(4, 40)), "response_ids": ids(rng.randint(1, 40))}
                for _ in range(4)
            ]
            assert client.post("/v1/rewards", json={"items": items}).status_code == 200
        prompt = ids(24)  # long enough to be shared
        group = [{"prompt_ids": prompt, "response_ids": ids(rng.randint(2, 16))} for _ in range(8)]
        assert client.post("/v1/rewards", json={"items": group}).status_code == 200
        assert client.post("/v1/rewards", json={"items": group, "baseline": "zero"}).is_success
        # Refused while parsing: errors by type only.
        assert client.post("/v1/rewards", content=b"{not json").status_code == 422
        # Refused after parsing (a token outside the vocabulary): also a rejected item.
        bad = [{"prompt_ids": [1, 2], "response_ids": [vocab + 5]}]
        assert client.post("/v1/rewards", json={"items": bad}).status_code == 422
        assert client.get("/no-such-route").status_code == 404
        assert client.get("/v1/rewards").status_code == 405
        assert client.get("/v1/model").status_code == 200


def _exported_names(url: str) -> set[str]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


@contextmanager
def _gpu_replica(model: RewardModel) -> Iterator[str]:
    """A /metrics endpoint as a replica on a CUDA device exports it: the service's own
    ``Metrics`` with its GPU collector, the CUDA memory readings faked (this machine has no GPU).
    Yields its host:port."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.set_model(dataclasses.replace(model.spec, device="cuda:0", dtype="bfloat16"))
    metrics.watch_gpu(torch.device("cuda:0"))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = generate_latest(registry)
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    readings = {"memory_allocated": 3e9, "memory_reserved": 4e9, "max_memory_allocated": 3.5e9}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in readings.items():
            patch.setattr(torch.cuda, name, lambda device=None, value=value: int(value))
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"127.0.0.1:{httpd.server_address[1]}"
        finally:
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=10)


@pytest.fixture(scope="module")
def stack(llama: RewardModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("prometheus")
    with (
        LiveServer(Settings(), model=llama) as server,
        _gpu_replica(llama) as gpu_replica,
        prometheus(work, [server.url.removeprefix("http://"), gpu_replica]) as base,
    ):
        instance = server.url.removeprefix("http://")
        first = wait_for_scrape_after(base, instance, 0.0)
        wait_for_scrape_after(base, gpu_replica, 0.0)
        vocab = int(httpx.get(f"{server.url}/v1/model", timeout=10).json()["vocab_size"])
        _traffic(server.url, vocab, seed=1)  # phase A: every series appears
        after_a = wait_for_scrape_after(base, instance, max(first, time.time()))
        _traffic(server.url, vocab, seed=2)  # phase B: every counter increases
        after_b = wait_for_scrape_after(base, instance, max(after_a, time.time()))
        yield Stack(server, gpu_replica, base, after_b + 0.5, _exported_names(server.url))


@pytest.mark.parametrize("query", QUERIES, ids=[q.where for q in QUERIES])
def test_dashboard_query_returns_data(stack: Stack, query: Query) -> None:
    check_dashboard_query(stack.prometheus, query, stack.eval_time)


def test_dashboard_reads_only_exported_metrics(stack: Stack) -> None:
    """Every series a panel reads is on the /metrics of the CPU server or of the GPU replica
    (GPU memory is exported on CUDA only)."""
    used = set().union(*(metric_names(q.expr) for q in QUERIES))
    assert used, "no metric found in the dashboard"
    exported = stack.exported | _exported_names(f"http://{stack.gpu_replica}")
    unknown = used - exported
    assert not unknown, f"the dashboard reads series the server does not export: {unknown}"
    assert "tokenreward_gpu_memory_bytes" in used - stack.exported


def test_memory_panel_shows_gpu_memory_or_process_memory(stack: Stack) -> None:
    """GPU memory for a replica on a GPU; the process's resident memory for one without."""
    (panel,) = [p for p in iter_panels(load_dashboard()["panels"]) if p["title"] == "Memory"]
    (target,) = panel["targets"]
    body = prom_query(stack.prometheus, substitute(target["expr"]), at=stack.eval_time)
    kinds: dict[str, set[str]] = {}
    for series in body["data"]["result"]:
        kinds.setdefault(series["metric"]["instance"], set()).add(series["metric"]["kind"])
    cpu_replica = stack.server.url.removeprefix("http://")
    assert kinds == {
        stack.gpu_replica: {"allocated", "reserved", "peak_allocated"},
        cpu_replica: {"process resident"},
    }


def test_traffic_reached_every_kind_of_series(stack: Stack) -> None:
    """The traffic made the series the panels are about, not just zeros."""
    body = prom_query(
        stack.prometheus,
        'sum by (__name__) ({__name__=~"tokenreward_(shared_prompt_items|rejected_items|errors)'
        '_total"})',
        at=stack.eval_time,
    )
    found = {r["metric"]["__name__"]: float(r["value"][1]) for r in body["data"]["result"]}
    assert found.get("tokenreward_shared_prompt_items_total", 0) > 0, found
    assert found.get("tokenreward_rejected_items_total", 0) > 0, found
    assert found.get("tokenreward_errors_total", 0) > 0, found


def test_dashboard_structure() -> None:
    dashboard = load_dashboard()
    panels = list(iter_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"datasource", "instance"}, "keep the variables few"
    assert variables["datasource"]["current"]["value"] == _provisioned_datasource()["uid"]
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel.get("description"), f"{panel['title']}: say what the panel shows"
        assert panel["targets"], panel["title"]
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in (
        "items / s",
        "tokens / s",
        "latency",
        "queue depth",
        "batch size",
        "padding efficiency",
        "errors by type",
        "score",
        "token-reward magnitude",
        "shared-prompt",
        "non-finite",
        "rejected items by reason",
        "memory",
        "model",
    ):
        assert topic in titles, f"no panel about {topic}"


def _provisioned_datasource() -> dict[str, Any]:
    folder = DEPLOY / "grafana" / "provisioning" / "datasources"
    (source,) = yaml.safe_load((folder / "prometheus.yml").read_text())["datasources"]
    assert isinstance(source, dict)
    return source


def test_grafana_provisioning_matches_the_stack() -> None:
    source = _provisioned_datasource()
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"  # the compose service
    scraping = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert source["jsonData"]["timeInterval"] == scraping["global"]["scrape_interval"]
    folder = DEPLOY / "grafana" / "provisioning" / "dashboards"
    (provider,) = yaml.safe_load((folder / "tokenreward.yml").read_text())["providers"]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./{DASHBOARD.parent.relative_to(REPO)}:{provider['options']['path']}:ro" in mounts


def test_shipped_prometheus_config_is_valid() -> None:
    check_prometheus_config(PROMETHEUS_CONFIG)
    (job,) = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"] == [{"targets": ["tokenreward:8000"]}]
