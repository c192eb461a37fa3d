"""The service on a local Ray cluster, checked through Ray itself (runs in ``.venvs/ray``).

``ray_serve_check.py JSON`` with ``address`` (the Ray head, started by the test), ``proxy``
(Ray Serve's HTTP URL), ``reference`` (a plain ``tokenreward serve`` of the same model),
``api_key``, ``fixed``, ``single`` and ``autoscaled`` (Serve config files derived from
``deploy/ray/serve.yaml``: 2 replicas, 1 replica, 1 to 2 replicas with short delays; all with
a health check every second), ``metrics_port``, ``serve`` (the ``serve`` CLI) and
``prometheus`` (the URL of a Prometheus that scrapes ``metrics_port`` and the port after it,
the replicas' own /metrics listeners). In order:

1. deploys ``fixed`` with ``serve run --non-blocking`` and compares results over HTTP and
   through a ``DeploymentHandle`` with the reference; reads each replica's /metrics; sends
   traffic of every kind the Grafana dashboard shows in two phases, each followed by a
   Prometheus scrape of both replicas, and reports when (the test evaluates the dashboard
   there) and how many items were scored;
2. kills one replica actor (``ray.kill``) while the client sends thousands of items through
   the proxy, then checks every result once and correct, and that Ray replaced the replica;
3. ends the batcher task of one replica, as a crash would, while clients send: its health
   check fails, Ray replaces it, and every result comes back once and correct;
4. deploys ``single`` while clients send requests: the replica that Ray stops drains;
5. deploys ``autoscaled``, loads it until Serve adds a replica, stops, and waits until Serve
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


def deployed_at() -> float | None:
    app = serve.status().applications.get(APP)
    return None if app is None else float(app.last_deployed_time_s)


def deploy(serve_cli: str, address: str, config: str) -> None:
    """``serve run --non-blocking CONFIG``, which returns once the config is sent; this returns
    once Serve applies it (the application's deploy time moves on), so that what follows
    sees the config's effects and not the state before it."""
    before = deployed_at()
    subprocess.run(
        [serve_cli, "run", "--address", address, "--non-blocking", config],
        check=True,
        capture_output=True,
        timeout=120,
    )
    wait_for("Serve to apply the config", lambda: deployed_at() != before, 60)


def deployment_status() -> tuple[str, str]:
    """The deployment's status and what set it (``HEALTH_CHECK_FAILED`` after a replica's
    health check failed, until its replacement runs)."""
    app = serve.status().applications.get(APP)
    if app is None or DEPLOYMENT not in app.deployments:
        return "", ""
    deployment = app.deployments[DEPLOYMENT]
    return deployment.status.value, deployment.status_trigger.value


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


def varied_traffic(
    client: RewardClient, http: httpx.Client, reference: RewardClient, vocab: int, seed: int
) -> int:
    """What the dashboard shows beyond plain items, through Ray's proxy: a GRPO-style group
    (one prompt, 8 responses: shared-prompt items), a body that is not JSON (an error), an item
    outside the vocabulary (a rejected item) and an unknown route. Returns the items scored."""
    rng = random.Random(seed)
    prompt = [rng.randrange(3, vocab) for _ in range(24)]  # long enough to be shared
    group = [
        {
            "id": f"g{seed}-{i}",
            "prompt_ids": prompt,
            "response_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(2, 16))],
        }
        for i in range(8)
    ]
    diff = max_diff(client.rewards(group), reference.rewards(group))
    assert diff <= 1e-5, diff
    assert http.post("/v1/rewards", content=b"{not json").status_code == 422
    outside = {"items": [{"prompt_ids": [1, 2], "response_ids": [vocab + 5]}]}
    assert http.post("/v1/rewards", json=outside).status_code == 422
    assert http.get("/no-such-route").status_code == 404
    return len(group)


def scraped_after(prometheus: str, after: float) -> float:
    """Wait until Prometheus holds a scrape of both replicas begun after ``after`` (Unix
    time), so that its data holds what they had counted by then; the latest one's time."""

    def scraped() -> float | None:
        # The raw samples of `up`: their timestamps are the scrapes'.
        query = {"query": 'up{job="tokenreward"}[30s]'}
        body = httpx.get(f"{prometheus}/api/v1/query", params=query, timeout=10).json()
        last = [series["values"][-1] for series in body["data"]["result"]]
        if len(last) == 2 and all(float(t) > after and v == "1" for t, v in last):
            return max(float(t) for t, _ in last)
        return None

    return float(wait_for("Prometheus's scrape of both replicas", scraped, 30))


def crash_batcher(actor: object) -> None:
    """Runs in a replica's process (``actor.__ray_call__``): ends the replica's batcher task
    as a crash would, on the replica's own event loop (Ray may run user code on a thread of
    its own), and leaves the rest of the replica serving. Nothing in the service is there for
    this test: the replica and its task are found among the process's objects."""
    import asyncio
    import gc

    from tokenreward_service.ray_serve import RewardReplica

    # Ray froze the objects of the replica's start (the replica, its task) out of the
    # collector's lists; back in them, gc.get_objects() lists them again.
    gc.unfreeze()
    found = gc.get_objects()
    # By type, not isinstance: that would ask proxies in the heap for their __class__.
    (replica,) = [o for o in found if RewardReplica in type(o).__mro__]
    replica.check_health()  # serving until now
    (task,) = [
        o
        for o in found
        if asyncio.Task in type(o).__mro__
        and o.get_name() == "tokenreward-batcher"
        and not o.done()
    ]
    task.get_loop().call_soon_threadsafe(task.cancel)


def health_check_error(actor: object) -> str | None:
    """Runs in a replica's process (after :func:`crash_batcher`, which made the replica
    visible to ``gc.get_objects()``): what its health check raises (None while it passes)."""
    import gc

    from tokenreward_service.ray_serve import RewardReplica

    (replica,) = [o for o in gc.get_objects() if RewardReplica in type(o).__mro__]
    try:
        replica.check_health()
    except RuntimeError as exc:
        return str(exc)
    return None


def listening(first: int, count: int) -> list[int]:
    """Which of the ``count`` ports from ``first`` on 127.0.0.1 answer /metrics."""
    found = []
    for port in range(first, first + count):
        try:
            httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        except httpx.HTTPError:
            continue
        found.append(port - first)
    return found


class Load:
    """Two clients sending ``items`` again and again until the block ends, each answer
    checked against ``want``: every result once, in order, and correct."""

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

    def seen(self) -> int:
        with self._lock:
            return sum(self.statuses.values())

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
    laps = [time.monotonic()]

    def lap(step: str) -> None:
        """The seconds that ``step`` took, in the report (where the test's time goes)."""
        laps.append(time.monotonic())
        report.setdefault("step_s", {})[step] = round(laps[-1] - laps[-2], 1)

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
    report["replica_items_after_check"] = replica_items(ports)
    proxy_metrics = httpx.get(f"{args['proxy']}/metrics").text
    report["proxy_metrics_has_items"] = "tokenreward_items_total" in proxy_metrics
    # Prometheus scrapes the replicas' listeners: every kind of traffic in two phases with a
    # scrape of both after each, so that every counter grows inside the dashboard's window.
    auth = {"Authorization": f"Bearer {key}"}
    http = httpx.Client(base_url=args["proxy"], headers=auth, timeout=60)
    scored = len(items) + 150  # by HTTP, then by handle
    scored += varied_traffic(client, http, reference, vocab, seed=1)
    scraped_after(args["prometheus"], time.time())
    scored += varied_traffic(client, http, reference, vocab, seed=2)
    per_replica = replica_items(ports)
    report["metrics"] = {
        "items_scored": scored,
        "replica_items": per_replica,
        "eval_time": scraped_after(args["prometheus"], time.time()) + 0.5,
    }
    http.close()
    lap("deploy, compare, metrics")

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
    lap("replica killed")

    # 3. A replica's batcher crashes while requests flow: Ray's health check (every second in
    # this test) fails on it, Ray stops it and starts another; the requests it answered 503
    # and those it held when Ray killed it come back and are retried.
    wait_for("a healthy deployment", lambda: deployment_status()[0] == "HEALTHY", 60)
    names_before = replica_names()
    with Load(args["proxy"], key, load_items, want_load) as load:
        wait_for("load", lambda: load.transport.seen() > 0, 60)
        victim = names_before[0]
        actor = ray.get_actor(victim, namespace="serve")
        ray.get(actor.__ray_call__.remote(crash_batcher))
        crashed = time.monotonic()
        calls = load.calls
        health_error = wait_for(
            "the health check to fail",
            lambda: ray.get(actor.__ray_call__.remote(health_check_error)),
            30,
        )
        timeline: dict[str, float] = {}

        def replaced() -> bool:
            """Notes when each stage of the replacement is first seen; true once all are."""
            status, names = deployment_status(), replica_names()
            new = set(names) - set(names_before)
            seen = {
                "unhealthy": status == ("UNHEALTHY", "HEALTH_CHECK_FAILED"),
                "started": bool(new),  # a replica actor of another name
                "replaced": bool(new) and running_replicas() == 2,  # the victim is not RUNNING
                "gone": victim not in names,
                "healthy": "unhealthy" in timeline and status[0] == "HEALTHY",
                # Renumbered once the victim is gone: a listener on each scrape target.
                "listeners": "gone" in timeline and listening(args["metrics_port"], 3) == [0, 1],
            }
            for stage, happened in seen.items():
                if happened:
                    timeline.setdefault(stage, round(time.monotonic() - crashed, 1))
            return len(timeline) == len(seen)

        wait_for("the replica's replacement", replaced, 120)
        wait_for("more load on the replicas", lambda: load.calls >= calls + 2, 60)
    report["health"] = {
        "check_health": health_error,
        "seconds_after_crash": timeline,
        "replicas_after": running_replicas(),
        "listeners_after": listening(args["metrics_port"], 3),
        "calls_before_crash": calls,
        "items_per_call": len(load_items),
        **load.report(),
    }
    lap("batcher crashed")

    # 4. Graceful stop: 2 replicas scaled to 1 while requests flow; the stopped one drains.
    with Load(args["proxy"], key, load_items, want_load) as load:
        wait_for("load", lambda: load.calls >= 1, 60)
        deploy(args["serve"], args["address"], args["single"])
        started = time.monotonic()
        wait_for("1 replica", lambda: app_running() and replica_states() == {"RUNNING": 1})
        report["drain"] = {"down_s": round(time.monotonic() - started, 1)}
        calls = load.calls
        wait_for("more load on the remaining replica", lambda: load.calls >= calls + 2, 60)
    report["drain"].update(load.report())
    lap("drain")

    # 5. Autoscaling: 1 replica idle, 2 under load, back to 1 after.
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
    lap("autoscale")
    client.close()
    reference.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
