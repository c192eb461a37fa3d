"""The service on Ray Serve (tokenreward_service.ray_serve, deploy/ray/).

The first tests need no Ray: a replica's life cycle as Ray drives it (build the app, run its
lifespan, health checks, the handle path, the drain), and the proxy middleware on small ASGI
apps. The last starts a real local Ray cluster (CPU) from ``.venvs/ray`` and a real
Prometheus that scrapes its replicas, and runs scripts/ray_serve_check.py there: 2 replicas
against a plain ``tokenreward serve`` of the same model, the Grafana dashboard on the replicas'
metrics, a replica killed under load, a replica whose batcher dies under load, a replica stopped
under load, and the autoscaler.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import json
import os
import pickle
import secrets
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import yaml
from starlette.types import Receive, Scope, Send

from tests.deploy.helpers import (
    RAY_PROMETHEUS_CONFIG,
    check_dashboard_query,
    dashboard_queries,
    prom_query,
    prometheus,
)
from tests.integrations.conftest import ROOT, run_in, trainer_python
from tokenreward.protocol import RewardRequest
from tokenreward_service.bench.runner import SpawnedServer, stop_process
from tokenreward_service.errors import ModelLoadError
from tokenreward_service.ray_serve import (
    DEFAULT_OPTIONS,
    HandleError,
    ProxyErrorShape,
    RewardReplica,
    build_app,
)

SERVE_CONFIG = ROOT / "deploy" / "ray" / "serve.yaml"
KEY = "ray-test-key-0123"
ITEMS = [
    {"id": "a", "prompt_ids": [5, 6, 7], "response_ids": [8, 9]},
    {"id": "b", "prompt_ids": [5, 6, 7], "response_ids": [10, 11, 12]},
    {"id": "c", "prompt_ids": [20, 21], "response_ids": [22]},
]


# -- a replica without Ray -------------------------------------------------------------------


def test_replica_life_cycle_as_ray_drives_it(llama_dir: Path) -> None:
    """What Ray does with a replica, in Ray's order: construct it, build the app (the model
    loads), run the app's lifespan (the batcher starts), health checks, handle calls and
    HTTP, then the lifespan's shutdown (the batcher stops) and a failing health check."""

    async def scenario() -> None:
        replica = RewardReplica(
            {"model": str(llama_dir), "device": "cpu", "api_keys": [KEY]}, metrics_port=0
        )
        with pytest.raises(RuntimeError, match="not built"):
            replica.check_health()
        app = await replica.__serve_build_asgi_app__()
        async with app.router.lifespan_context(app):
            replica.check_health()  # model loaded, batcher running: healthy
            # The handle path: the app's own validation, batcher and metrics.
            response = await replica.rewards(RewardRequest.model_validate({"items": ITEMS}))
            from_dict = await replica.rewards({"items": ITEMS})
            assert response == from_dict
            assert [len(r.token_rewards) for r in response.results] == [2, 3, 1]
            with pytest.raises(HandleError) as refused:
                await replica.rewards(
                    {"items": [ITEMS[0], {"prompt_ids": [1], "response_ids": ["x"]}]}
                )
            assert (refused.value.status, refused.value.type) == (422, "invalid_request")
            assert refused.value.item == 1
            # Over HTTP (what Ray's proxy sends), with the API key, the same numbers.
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://r") as http:
                denied = await http.post("/v1/rewards", json={"items": ITEMS})
                assert denied.status_code == 401
                assert denied.json()["error"]["type"] == "unauthorized"
                answer = await http.post(
                    "/v1/rewards",
                    json={"items": ITEMS},
                    headers={"Authorization": f"Bearer {KEY}"},
                )
                assert answer.json() == response.model_dump(mode="json")
            # This replica's own /metrics listener counts the handle calls and HTTP alike.
            assert replica.metrics_address is not None
            host, port = replica.metrics_address
            text = (await asyncio.to_thread(httpx.get, f"http://{host}:{port}/metrics")).text
            assert 'tokenreward_requests_total{route="/v1/rewards",status="200"} 3.0' in text
            assert "tokenreward_items_total 9.0" in text
        # Ray ran the lifespan's shutdown (after draining the replica's ongoing requests):
        # the batcher has finished its queue and stopped; the replica reports unhealthy.
        with pytest.raises(RuntimeError, match="not running"):
            replica.check_health()
        replica.__del__()  # Ray's shutdown: the metrics listener closes
        with pytest.raises(httpx.ConnectError):
            await asyncio.to_thread(httpx.get, f"http://{host}:{port}/metrics")

    asyncio.run(scenario())


def test_health_check_fails_when_the_batcher_dies(llama_dir: Path) -> None:
    """Ray replaces a replica whose health check raises: a scheduler that died makes it
    raise (here its task is cancelled, as a crash would end it)."""

    async def scenario() -> None:
        replica = RewardReplica({"model": str(llama_dir), "device": "cpu"})
        app = await replica.__serve_build_asgi_app__()
        async with app.router.lifespan_context(app):
            replica.check_health()
            (scheduler,) = [t for t in asyncio.all_tasks() if t.get_name() == "tokenreward-batcher"]
            scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scheduler
            with pytest.raises(RuntimeError, match="not running"):
                replica.check_health()

    asyncio.run(scenario())


def test_metrics_listener_follows_the_local_rank(llama_dir: Path) -> None:
    """Ray renumbers a node's replicas once a replaced one has gone (its replacement started on
    the next rank meanwhile): the listener moves to ``metrics_port`` + the rank Ray gives, so
    that the ports a scrape configuration lists reach every replica. A port still taken
    leaves the listener where it is; a user_config is refused (the settings are the args)."""
    base = _free_port(consecutive=2)

    def scrape(port: int) -> str:
        return httpx.get(f"http://127.0.0.1:{port}/metrics").text

    async def scenario() -> None:
        settings = {"model": str(llama_dir), "device": "cpu", "host": "127.0.0.1"}
        replica = RewardReplica(settings, metrics_port=base)
        await replica.reconfigure(None, rank=SimpleNamespace(local_rank=1))  # before the build
        app = await replica.__serve_build_asgi_app__()
        async with app.router.lifespan_context(app):
            assert replica.metrics_address == ("127.0.0.1", base)  # rank 0 outside Ray
            await replica.reconfigure(None, rank=SimpleNamespace(local_rank=1))
            assert replica.metrics_address == ("127.0.0.1", base + 1)
            assert "tokenreward_items_total" in await asyncio.to_thread(scrape, base + 1)
            with pytest.raises(httpx.ConnectError):
                await asyncio.to_thread(scrape, base)
            with socket.socket() as other:  # another process holds the port
                other.bind(("127.0.0.1", base))
                other.listen()
                await replica.reconfigure(None, rank=SimpleNamespace(local_rank=0))
                assert replica.metrics_address == ("127.0.0.1", base + 1)
            with pytest.raises(ValueError, match="user_config"):
                await replica.reconfigure({"max_batch_tokens": 1}, rank=None)
        replica.__del__()
        with pytest.raises(httpx.ConnectError):
            await asyncio.to_thread(scrape, base + 1)

    asyncio.run(scenario())


def test_a_model_that_cannot_load_fails_the_replica(tmp_path: Path) -> None:
    """The model loads while Ray builds the replica, so a bad one fails the replica's start
    (Ray retries it, then marks the deployment failed) instead of serving 503s."""
    replica = RewardReplica({"model": str(tmp_path / "missing"), "device": "cpu"})
    with pytest.raises((ModelLoadError, OSError)):
        asyncio.run(replica.__serve_build_asgi_app__())


def test_settings_are_validated_when_the_application_is_built() -> None:
    with pytest.raises(ValueError, match="max_batch_tokens"):
        build_app({"settings": {"max_batch_tokens": 0}})
    with pytest.raises(ValueError, match="unknown application arguments"):
        build_app({"setting": {}})


def test_handle_errors_survive_pickling() -> None:
    """Ray sends a handle call's exception to the caller pickled."""
    error = pickle.loads(pickle.dumps(HandleError(429, "overloaded", "queue full", None, 2)))
    assert (error.status, error.type, error.message, error.item, error.retry_after) == (
        429,
        "overloaded",
        "queue full",
        None,
        2,
    )


def test_max_ongoing_requests_leaves_queueing_to_the_batcher() -> None:
    """Ray's default (5 requests per replica) would keep requests in Ray's proxy, where the
    batcher can neither batch them together nor refuse them with 429."""
    (application,) = yaml.safe_load(SERVE_CONFIG.read_text())["applications"]
    (deployment,) = application["deployments"]
    assert deployment["max_ongoing_requests"] == DEFAULT_OPTIONS["max_ongoing_requests"] >= 1000
    autoscaling = deployment["autoscaling_config"]
    assert autoscaling["target_ongoing_requests"] < deployment["max_ongoing_requests"]


# -- Ray's proxy: one error shape ------------------------------------------------------------


async def _through_middleware(
    app: Callable[[Scope, Receive, Send], Any], path: str
) -> httpx.Response:
    transport = httpx.ASGITransport(app=ProxyErrorShape(app))
    async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as http:
        return await http.post(path, content=b"{}")


def _plain(status: int, text: bytes, headers: Sequence[tuple[bytes, bytes]] = ()) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        head = [(b"content-type", b"text/plain; charset=utf-8"), *headers]
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": text, "more_body": False})

    return app


def test_proxy_answers_for_a_replica_that_died_with_a_retryable_error() -> None:
    """Ray's proxy ends without an answer when the replica holding the request dies (uvicorn
    would send a bare 500, which clients do not retry): it becomes not_ready 503."""

    async def dies(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("ActorDiedError")

    async def silent(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    for app in (dies, silent, _plain(500, b"Internal Server Error")):
        answer = asyncio.run(_through_middleware(app, "/v1/rewards"))
        assert answer.status_code == 503
        assert answer.json()["error"]["type"] == "not_ready"
        assert answer.json()["error"]["item"] is None


def test_proxy_errors_keep_their_status_in_the_error_shape() -> None:
    overloaded = _plain(429, b"back pressure", [(b"retry-after", b"3")])
    answer = asyncio.run(_through_middleware(overloaded, "/v1/rewards"))
    assert (answer.status_code, answer.headers["retry-after"]) == (429, "3")
    assert answer.json()["error"] == {
        "type": "overloaded",
        "message": "Ray Serve: back pressure",
        "item": None,
    }
    for status, wanted, kind in [(404, 404, "not_found"), (408, 504, "timeout")]:
        answer = asyncio.run(_through_middleware(_plain(status, b"no"), "/x"))
        assert (answer.status_code, answer.json()["error"]["type"]) == (wanted, kind)


def test_replica_answers_and_ray_routes_pass_untouched() -> None:
    async def shaped(scope: Scope, receive: Receive, send: Send) -> None:
        head = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 500, "headers": head})
        await send({"type": "http.response.body", "body": b'{"error": 1}', "more_body": False})

    answer = asyncio.run(_through_middleware(shaped, "/v1/rewards"))
    assert (answer.status_code, answer.content) == (500, b'{"error": 1}')
    answer = asyncio.run(_through_middleware(_plain(503, b"no replicas"), "/-/healthz"))
    assert (answer.status_code, answer.text) == (503, "no replicas")
    answer = asyncio.run(_through_middleware(_plain(200, b"fine"), "/v1/model"))
    assert (answer.status_code, answer.text) == (200, "fine")


# -- a real Ray cluster ----------------------------------------------------------------------


def _free_port(consecutive: int = 1) -> int:
    """A free port of 127.0.0.1 (and the ``consecutive - 1`` after it)."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + consecutive > 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for offset in range(1, consecutive):
                    extra = stack.enter_context(socket.socket())
                    extra.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return port
    raise RuntimeError("no free ports")


def serve_configs(folder: Path, http_port: int, metrics_port: int) -> dict[str, str]:
    """deploy/ray/serve.yaml made to fit this machine: CPU, the embedded model, 127.0.0.1, a
    test API key; 2 replicas, 1 replica, or 1 to 2 replicas scaling within seconds.

    Every variant keeps the autoscaling_config, the fixed counts as its bounds: Ray's code
    version of an application changes when a deployment gains or loses an autoscaling_config,
    and going from one variant to the next would then restart every replica, not resize.
    Ray checks health every second (three failures in a row and Ray replaces the replica) and
    waits 10 s for a stopping replica's requests: a replica with a dead batcher holds its
    queued requests until Ray kills it, and the test waits for them.
    """
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    (application,) = config["applications"]
    application["args"] = {
        "settings": {"device": "cpu", "host": "127.0.0.1", "api_keys": [KEY]},
        "metrics_port": metrics_port,
    }
    (deployment,) = application["deployments"]
    deployment["ray_actor_options"] = {"num_cpus": 0.5}
    deployment["graceful_shutdown_timeout_s"] = 10
    deployment["health_check_period_s"] = 1
    deployment["health_check_timeout_s"] = 5
    deployment["autoscaling_config"].update(
        target_ongoing_requests=2, look_back_period_s=2, upscale_delay_s=1, downscale_delay_s=2
    )
    variants = {
        "fixed": {"min_replicas": 2, "initial_replicas": 2, "max_replicas": 2},
        "single": {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 1},
        "autoscaled": {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 2},
    }
    paths = {}
    for name, options in variants.items():
        variant = copy.deepcopy(config)
        variant["applications"][0]["deployments"][0]["autoscaling_config"].update(options)
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(variant))
        paths[name] = str(path)
    return paths


@contextlib.contextmanager
def ray_head(venv: Path, env: dict[str, str]) -> Iterator[str]:
    """``ray start --head --block`` on 127.0.0.1 (this test's own cluster, with its own ports
    and temporary folder); stopped, with every process it started, by SIGTERM at the end."""
    port = _free_port()
    folder = tempfile.mkdtemp(prefix="trray")  # short: Ray's socket paths must fit 107 bytes
    command = [
        str(venv / "bin" / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--num-cpus=4",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={folder}",
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
    ]
    log_path = Path(folder) / "head.log"
    with log_path.open("wb") as log:
        head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while b"Ray runtime started" not in log_path.read_bytes():
            if head.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"ray start failed:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(head)


@pytest.mark.slow
def test_ray_serve_cluster(
    serve: Callable[[Sequence[str]], SpawnedServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    python = trainer_python("ray")
    env = {
        # A token for this cluster alone (Ray 2.60 clusters require one by default).
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        # Autoscaling metrics every half second instead of every 10 s: the test waits less.
        "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
        "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": (
            "tokenreward_service.ray_serve:proxy_middlewares"
        ),
        # The cluster is thrown away: no 30 s node drain when the head is stopped.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # the scripts run_in starts inherit them
    http_port, metrics_port = _free_port(), _free_port(consecutive=2)
    configs = serve_configs(tmp_path, http_port, metrics_port)
    replicas = [f"127.0.0.1:{metrics_port}", f"127.0.0.1:{metrics_port + 1}"]
    (tmp_path / "prometheus").mkdir()
    with (
        concurrent.futures.ThreadPoolExecutor(1) as starter,
        prometheus(tmp_path / "prometheus", replicas, RAY_PROMETHEUS_CONFIG) as scraper,
    ):
        # The reference server starts while the Ray head does: each takes seconds.
        starting = starter.submit(serve, ["--device", "cpu"])
        with ray_head(python.parent.parent, {**os.environ}) as address:
            reference = starting.result()
            arguments = {
                "address": address,
                "proxy": f"http://127.0.0.1:{http_port}",
                "reference": reference.url,
                "api_key": KEY,
                "metrics_port": metrics_port,
                "serve": str(python.parent / "serve"),
                "prometheus": scraper,
                **configs,
            }
            report = run_in("ray", "ray_serve_check.py", json.dumps(arguments), timeout=400)
        print(json.dumps(report, indent=1))
        # Prometheus scraped both replicas with deploy/prometheus/ray.yml: each counted its own
        # items, which add up to what the client had scored when the script last saw a scrape.
        metrics = report["metrics"]
        at = metrics["eval_time"]
        counted = prom_query(scraper, 'tokenreward_items_total{job="tokenreward"}', at=at)
        by_replica = {
            r["metric"]["instance"]: float(r["value"][1]) for r in counted["data"]["result"]
        }
        assert sorted(by_replica) == sorted(replicas)
        assert all(count > 0 for count in by_replica.values()), by_replica
        assert sum(by_replica.values()) == sum(metrics["replica_items"]) == metrics["items_scored"]
        # Every expression of the Grafana dashboard gives data on the replicas' series.
        failed = []
        for query in dashboard_queries():
            try:
                check_dashboard_query(scraper, query, at)
            except AssertionError as exc:
                failed.append(str(exc))
        assert not failed, "\n".join(failed)
    assert report["model"] == "tokenreward-demo-sentiment"
    # 2 replicas give what one `tokenreward serve` gives, by HTTP and through a handle.
    assert report["http_max_diff"] <= 1e-5
    assert report["handle_max_diff"] <= 1e-5
    assert report["handle_dict_max_diff"] <= 1e-5
    assert report["handle_error"] == [422, "invalid_request", 1]
    # Both replicas served, each counted in its own /metrics; the proxy's /metrics answers.
    assert all(count > 0 for count in report["replica_items_after_check"])
    assert report["proxy_metrics_has_items"]
    # A replica killed mid-load: every result once and correct, the replica replaced; the
    # requests it held came back as 503 (the proxy middleware) and were retried.
    kill = report["kill"]
    assert kill["error"] is None
    assert 0 < kill["served_before_kill"] < kill["items"]
    assert kill["results"] == kill["unique_ids"] == kill["items"]
    assert kill["max_diff"] <= 1e-5
    assert kill["replaced"]
    assert set(kill["statuses"]) <= {"200", "503"}
    # A replica whose batcher died under load (its task cancelled, as a crash ends it): its
    # health check fails, Ray marks it unhealthy within seconds (three checks a second apart)
    # and runs another; the requests it refused (503) or held until Ray killed it were
    # retried: every result once and correct.
    health = report["health"]
    assert health["check_health"] == "the batch scheduler is not running"
    assert health["error"] is None
    assert health["max_diff"] <= 1e-5
    assert health["calls"] > health["calls_before_crash"]
    assert set(health["statuses"]) <= {"200", "503"}
    assert health["replicas_after"] == 2
    after = health["seconds_after_crash"]
    assert after["unhealthy"] < 15
    assert after["unhealthy"] <= after["started"] <= after["replaced"] < 60
    assert after["unhealthy"] <= after["gone"] <= after["listeners"] < 60
    # Ray renumbered the replicas once the crashed one was gone (its replacement may have
    # started on the next rank): the listeners followed, so the scrape targets, metrics_port
    # and the port after it, reach both replicas again.
    assert health["listeners_after"] == [0, 1]
    # A replica stopped while requests flow: it drains; nothing fails or needs a retry.
    drain = report["drain"]
    assert drain["error"] is None
    assert drain["max_diff"] <= 1e-5
    assert set(drain["statuses"]) == {"200"}
    # The autoscaler adds the second replica under load and removes it after.
    autoscale = report["autoscale"]
    assert autoscale["error"] is None
    assert autoscale["max_diff"] <= 1e-5
    assert autoscale["up_s"] < 90
    assert autoscale["down_s"] < 90


def test_serve_configs_validate_with_ray_schema() -> None:
    """deploy/ray/serve.yaml and the RayService's serveConfigV2 against Ray Serve's own
    config schema (ServeDeploySchema), and the builder imports as Serve imports it."""
    trainer_python("ray")
    report = run_in(
        "ray",
        "ray_config_check.py",
        str(SERVE_CONFIG),
        str(ROOT / "deploy" / "ray" / "rayservice.yaml"),
    )
    assert report == {"valid": 2, "deployment_options": "ok"}
