"""The service on a local Ray cluster, checked through Ray itself (runs in ``.venvs/ray``).

``ray_serve_check.py JSON`` with ``address`` (the Ray head, started by the test), ``proxy``
(Ray Serve's HTTP URL), ``reference`` (a plain ``tokenreward serve`` of the same model),
``api_key``, ``fixed``, ``single`` and ``autoscaled`` (Serve config files derived from
``deploy/ray/serve.yaml``: 2 replicas, 1 replica, 1 to 2 replicas with short delays),
``metrics_port`` and ``serve`` (the ``serve`` CLI). In order:

1. deploys ``fixed`` with ``serve run --non-blocking`` and compares results over HTTP and
   through a ``DeploymentHandle`` with the reference; reads each replica's /metrics;
2. kills one replica actor (``ray.kill``) while the client sends thousands of items through
   the proxy, then checks every result once and correct, and that Ray replaced the replica;
3. deploys ``single`` while clients send requests: the replica that Ray stops drains;
4. deploys ``autoscaled``, loads it until Serve adds a replica, stops, and waits until Serve
   removes it.

Every wait polls the state it waits for. Prints one JSON line: what it measured.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import ray
from ray import serve

from tokenreward import RewardClient
from tokenreward.protocol import RewardRequest, RewardResult
from tokenreward_service.ray_serve import DEPLOYMENT, HandleError

APP = "tokenreward"
REPLICA_PREFIX = f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#"


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last status: {serve.status()}")
        time.sleep(0.1)


def running_replicas() -> int:
    app = serve.status().applications.get(APP)
    if app is None or DEPLOYMENT not in app.deployments:
        return -1
    return int(app.deployments[DEPLOYMENT].replica_states.get("RUNNING", 0))


def replica_states() -> dict[str, int]:
    app = serve.status().applications.get(APP)
    if app is None or DEPLOYMENT not in app.deployments:
        return {}
    return {str(k): int(v) for k, v in app.deployments[DEPLOYMENT].replica_states.items()}


def replica_names() -> list[str]:
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(REPLICA_PREFIX)
    )


def deploy(serve_cli: str, address: str, config: str) -> None:
    subprocess.run(
        [serve_cli, "run", "--address", address, "--non-blocking", config],
        check=True,
        capture_output=True,
        timeout=120,
    )


def app_running() -> bool:
    app = serve.status().applications.get(APP)
    if app is not None and app.status == "DEPLOY_FAILED":
        raise AssertionError(f"deployment failed: {app.message}")
    return app is not None and app.status == "RUNNING"


def make_items(count: int, vocab: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    items = []
    for i in range(count):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(4, 40))]
        response = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 40))]
        items.append({"id": f"s{seed}-{i}", "prompt_ids": prompt, "response_ids": response})
    return items


def max_diff(got: list[RewardResult], want: list[RewardResult]) -> float:
    assert len(got) == len(want), (len(got), len(want))
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        assert a.id == b.id, (a.id, b.id)
        assert len(a.token_rewards) == len(b.token_rewards), a.id
        for x, y in zip(a.token_rewards, b.token_rewards, strict=True):
            worst = max(worst, abs(x - y))
        worst = max(worst, abs(a.score - b.score))
    return worst


def replica_items(ports: list[int]) -> list[float]:
    """``tokenreward_items_total`` of each replica, from its own /metrics listener."""
    counts = []
    for port in ports:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        (line,) = [x for x in text.splitlines() if x.startswith("tokenreward_items_total ")]
        counts.append(float(line.split()[1]))
    return counts


class Load:
    """Two clients sending ``items`` again and again until the block ends, each answer
    checked against ``want``."""

    def __init__(self, url: str, key: str, items: list[dict[str, Any]], want: list[Any]) -> None:
        self.transport = Counting()
        self.client = RewardClient(
            url, api_key=key, max_items_per_request=10, transport=self.transport
        )
        self.items = items
        self.want = want
        self.diffs: list[float] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(2)]

    @property
    def calls(self) -> int:
        return len(self.diffs)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.diffs.append(max_diff(self.client.rewards(self.items), self.want))
            except BaseException as exc:
                self.errors.append(exc)
                return

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)
        self.client.close()

    def report(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "max_diff": max(self.diffs) if self.diffs else None,
            "error": None if not self.errors else repr(self.errors[0]),
            "statuses": self.transport.take(),
        }


class Counting(httpx.HTTPTransport):
    """Counts the statuses the client receives (retries included)."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: dict[int, int] = {}
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        with self._lock:
            self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1
        return response

    def take(self) -> dict[int, int]:
        with self._lock:
            taken, self.statuses = self.statuses, {}
        return taken


def main() -> None:
    args = json.loads(sys.argv[1])
    ray.init(address=args["address"], logging_level="ERROR", log_to_driver=False)
    report: dict[str, Any] = {}
    key = args["api_key"]
    counting = Counting()
    client = RewardClient(
        args["proxy"], api_key=key, max_items_per_request=50, timeout=300, transport=counting
    )
    reference = RewardClient(args["reference"], max_items_per_request=500, timeout=300)

    # 1. Two replicas: the same results as a plain `tokenreward serve`, by HTTP and by handle.
    started = time.monotonic()
    deploy(args["serve"], args["address"], args["fixed"])
    wait_for("the application", app_running)
    wait_for("2 running replicas", lambda: running_replicas() == 2)
    report["deploy_s"] = round(time.monotonic() - started, 1)
    model = httpx.get(f"{args['proxy']}/v1/model", headers={"Authorization": f"Bearer {key}"})
    vocab = int(model.json()["vocab_size"])
    report["model"] = model.json()["id"]
    items = make_items(400, vocab, seed=1)
    want = reference.rewards(items)
    report["http_max_diff"] = max_diff(client.rewards(items), want)
    handle = serve.get_app_handle(APP)
    response = handle.rewards.remote(RewardRequest.model_validate({"items": items[:100]})).result()
    report["handle_max_diff"] = max_diff(list(response.results), want[:100])
    response = handle.rewards.remote({"items": items[100:150]}).result()
    report["handle_dict_max_diff"] = max_diff(list(response.results), want[100:150])
    bad = {"items": [items[0], {"prompt_ids": [1, 2], "response_ids": [3, "x"]}]}
    try:
        handle.rewards.remote(bad).result()
    except HandleError as error:
        report["handle_error"] = [error.status, error.type, error.item]
    ports = [args["metrics_port"], args["metrics_port"] + 1]
    per_replica = replica_items(ports)
    report["replica_items_after_check"] = per_replica
    proxy_metrics = httpx.get(f"{args['proxy']}/metrics").text
    report["proxy_metrics_has_items"] = "tokenreward_items_total" in proxy_metrics

    # 2. A replica killed while thousands of items are in flight.
    names_before = replica_names()
    big = make_items(3000, vocab, seed=2)
    want_big = reference.rewards(big)
    got: list[RewardResult] = []
    failure: list[BaseException] = []

    def send() -> None:
        try:
            got.extend(client.rewards(big))
        except BaseException as exc:
            failure.append(exc)

    sender = threading.Thread(target=send)
    base = sum(per_replica)
    counting.take()
    sender.start()
    started = time.monotonic()
    wait_for("load on the replicas", lambda: sum(replica_items(ports)) - base >= 300, 60)
    victim = names_before[0]
    served_before_kill = sum(replica_items(ports)) - base
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    sender.join(timeout=300)
    report["kill"] = {
        "items": len(big),
        "served_before_kill": served_before_kill,
        "seconds": round(time.monotonic() - started, 1),
        "error": None if not failure else repr(failure[0]),
        "statuses": counting.take(),
    }
    if not failure:
        report["kill"]["max_diff"] = max_diff(got, want_big)
        report["kill"]["results"] = len(got)
        report["kill"]["unique_ids"] = len({r.id for r in got})
    replaced = wait_for(
        "a replacement replica",
        lambda: running_replicas() == 2 and victim not in (names := replica_names()) and names,
    )
    report["kill"]["replaced"] = victim not in replaced and len(replaced) == 2
    report["kill"]["replica_states"] = replica_states()

    load_items = make_items(400, vocab, seed=3)
    want_load = reference.rewards(load_items)

    # 3. Graceful stop: 2 replicas scaled to 1 while requests flow; the stopped one drains.
    with Load(args["proxy"], key, load_items, want_load) as load:
        wait_for("load", lambda: load.calls >= 1, 60)
        deploy(args["serve"], args["address"], args["single"])
        started = time.monotonic()
        wait_for("1 replica", lambda: app_running() and replica_states() == {"RUNNING": 1})
        report["drain"] = {"down_s": round(time.monotonic() - started, 1)}
        calls = load.calls
        wait_for("more load on the remaining replica", lambda: load.calls >= calls + 2, 60)
    report["drain"].update(load.report())

    # 4. Autoscaling: 1 replica idle, 2 under load, back to 1 after.
    deploy(args["serve"], args["address"], args["autoscaled"])
    wait_for("autoscaling in force", lambda: app_running() and running_replicas() == 1)
    started = time.monotonic()
    with Load(args["proxy"], key, load_items, want_load) as load:
        wait_for("the autoscaler's decision", lambda: sum(replica_states().values()) == 2, 90)
        report["autoscale"] = {"decided_s": round(time.monotonic() - started, 1)}
        wait_for("a second replica under load", lambda: running_replicas() == 2, 90)
        report["autoscale"]["up_s"] = round(time.monotonic() - started, 1)
    started = time.monotonic()
    wait_for("back to 1 replica", lambda: replica_states() == {"RUNNING": 1}, 90)
    report["autoscale"]["down_s"] = round(time.monotonic() - started, 1)
    report["autoscale"].update(load.report())
    client.close()
    reference.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
