"""The server under hostile overload: clients that offer far more than it can take and ignore
``Retry-After``, next to well-behaved ones, against a saturated-but-well-behaved baseline.

    .venv/bin/python benchmarks/hostile_overload.py [--seconds 30] [--hostile-processes 2]
        [--hostile-connections 2] [--hostile-items 88] [--polite-clients 4] [--no-control]
        [--max-queued-tokens 65536] [--out PATH]

It starts ``tokenreward serve`` (a real process, on 127.0.0.1 only) on the benchmark RM that
``tokenreward bench`` uses (random Llama weights, see ``BENCH_MODEL_SIZES``), with
``--max-queued-tokens`` small enough that the queue fills within a second on a 2-core CPU, every
other setting at its default. Then three phases of ``--seconds`` each, in this order:

- **baseline**: ``--polite-clients`` well-behaved clients (one process, httpx) send ``mixed``-
  shaped requests (8 items, prompt 32-256, response 16-384 token IDs, seeded) in a closed loop,
  sleeping ``Retry-After`` after a 429 and sending the same request again. Enough to keep the
  model busy, never enough to fill the queue.
- **control** (``--no-control`` leaves it out): the hostile phase's clients and bodies, but
  the big-body clients honour ``Retry-After`` (httpx, as the polite ones). The queue is as
  full and the batches as large as under hostile load, so hostile ÷ control is the cost of the
  refusal storm alone, and control ÷ baseline that of a full queue (on a CPU, larger batches
  cost more per token).
- **hostile**: the same polite clients, plus ``--hostile-processes`` processes of
  ``--hostile-connections`` kept-alive connections each that send bodies of
  ``--hostile-items`` items of the same shape (about 170 KB, 30k tokens) in a tight loop and
  ignore ``Retry-After``: on a 429 they send again at once. They speak HTTP/1.1 over raw
  sockets with the request bytes built in advance, so that the client's own CPU per attempt is
  as small as Python allows (on this machine the clients share the server's two cores). With
  the defaults they keep about 11x the baseline's tokens in flight.

Figures of each phase, over the same window:

- the model: real tokens computed per second (``tokenreward_tokens_total{kind="real"}``), the
  share of wall time in forward passes (``tokenreward_inference_duration_seconds_sum``), and
  tokens per second of forward pass (how fast the forward pass itself ran);
- ``/healthz`` as a probe sees it: a fresh connection every 50 ms from this process;
- each client group: latency of 200s (the admitted attempt; for polite clients also from the
  first attempt, waiting included), 429 count and how fast a 429 came back, split by where the
  server refused: ``early`` (from the request head alone, ``AdmissionMiddleware``),
  ``inflight`` (the in-flight bytes bound) or ``after_parse`` (the body read and parsed, then
  refused by the queue);
- CPU seconds of the server (its event-loop thread apart from the rest), of each client
  group, of this process and of the rest of the machine, so that contention on the shared
  cores can be judged;
- a timeline sampled every second from ``/metrics`` (tokens, forward-pass seconds, 429s,
  queue depth), and from it the forward pass's speed in batches that ran during a refusal
  storm (>= 50 429s a second) against those that ran in quiet (< 5 a second).

Progress goes to stderr, a summary table to stdout, and the full report to ``--out``
(``docs/bench-cpu-2026-11-29-hostile.json`` by default).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "bench-cpu-2026-11-29-hostile.json"
PROBE_INTERVAL_S = 0.05
SAMPLE_INTERVAL_S = 1.0
START_DELAY_S = 3.0
"""Client processes are started this long before their phase, to import and build bodies."""
GRACE_S = 30.0
"""After a phase's deadline, requests still in flight get this long to finish, then are cut."""
DRAIN_TIMEOUT_S = 60.0

REAL = 'tokenreward_tokens_total{kind="real"}'
PADDED = 'tokenreward_tokens_total{kind="padded"}'
SUBMITTED = 'tokenreward_tokens_total{kind="submitted"}'
INFER_SUM = "tokenreward_inference_duration_seconds_sum"
INFER_COUNT = "tokenreward_inference_duration_seconds_count"
BATCH_PADDED_SUM = "tokenreward_batch_padded_tokens_sum"
BATCH_PADDED_COUNT = "tokenreward_batch_padded_tokens_count"
QUEUE_TOKENS = "tokenreward_queue_tokens"
HEALTHZ_SUM = 'tokenreward_request_duration_seconds_sum{route="/healthz"}'
HEALTHZ_COUNT = 'tokenreward_request_duration_seconds_count{route="/healthz"}'
REWARDS_STATUS = 'tokenreward_requests_total{route="/v1/rewards",status="%s"}'


def _log(message: str) -> None:
    print(f"[hostile {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentiles(values: Sequence[float]) -> dict[str, float] | None:
    """p50/p90/p99/max of ``values`` (nearest rank), in the unit given; None when empty."""
    if not values:
        return None
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "n": len(ordered),
        "p50": pick(0.5),
        "p90": pick(0.9),
        "p99": pick(0.99),
        "max": ordered[-1],
    }


# --- workload --------------------------------------------------------------------------------


def mixed_items(rng: random.Random, count: int, vocab_size: int) -> list[dict[str, list[int]]]:
    """``count`` items of the ``mixed`` workload's shape (prompt 32-256, response 16-384)."""
    return [
        {
            "prompt_ids": [rng.randrange(vocab_size) for _ in range(rng.randint(32, 256))],
            "response_ids": [rng.randrange(vocab_size) for _ in range(rng.randint(16, 384))],
        }
        for _ in range(count)
    ]


@dataclass(frozen=True)
class Body:
    data: bytes
    tokens: int
    response_lens: tuple[int, ...]


def make_bodies(seed: str, count: int, items: int, vocab_size: int) -> list[Body]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        batch = mixed_items(rng, items, vocab_size)
        out.append(
            Body(
                orjson.dumps({"items": batch}),
                sum(len(i["prompt_ids"]) + len(i["response_ids"]) for i in batch),
                tuple(len(i["response_ids"]) for i in batch),
            )
        )
    return out


def refusal_kind(payload: bytes) -> str:
    """Where the server refused a 429, from its message (see routes.py and batching.py)."""
    with contextlib.suppress(ValueError, KeyError, TypeError):
        message = str(orjson.loads(payload)["error"]["message"])
        if "this body holds at least" in message:
            return "early"
        if "request bytes are being received" in message:
            return "inflight"
        if "tokens waiting" in message:
            return "after_parse"
    return "other"


# --- raw HTTP/1.1 over one socket (the hostile clients and the probe) ----------------------


class Connection:
    """One kept-alive HTTP/1.1 connection; strict request-then-response, no pipelining."""

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def request(self, raw: bytes, timeout_s: float) -> tuple[int, dict[str, str], bytes]:
        self.sock.settimeout(max(0.05, timeout_s))
        self.sock.sendall(raw)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self._fill()
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        del self.buffer[: end + 4]
        status = int(head[0].split(" ", 2)[1])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            self._fill()
        payload = bytes(self.buffer[:length])
        del self.buffer[:length]
        return status, headers, payload

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 18)
        if not chunk:
            raise ConnectionResetError("the server closed the connection")
        self.buffer += chunk


def post_bytes(host: str, port: int, body: bytes) -> bytes:
    return (
        f"POST /v1/rewards HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


# --- client roles (each its own process) -----------------------------------------------------


@dataclass
class Tally:
    """What one client group saw; merged across connections and written as JSON."""

    attempts: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    ok_latency_s: list[float] = field(default_factory=list)
    ok_end_to_end_s: list[float] = field(default_factory=list)
    refusal_latency_s: dict[str, list[float]] = field(default_factory=dict)
    retry_after_s: dict[str, int] = field(default_factory=dict)
    offered_tokens: int = 0
    admitted_tokens: int = 0
    in_window_attempts: int = 0
    in_window_offered_tokens: int = 0
    in_window_admitted_tokens: int = 0
    connects: int = 0
    unfinished: int = 0
    started_late_s: float = 0.0

    def record(
        self,
        status: str,
        elapsed: float,
        tokens: int,
        in_window: bool,
        *,
        kind: str | None = None,
        retry_after: str | None = None,
    ) -> None:
        self.attempts += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.offered_tokens += tokens
        if in_window:
            self.in_window_attempts += 1
            self.in_window_offered_tokens += tokens
        if status == "200":
            self.ok_latency_s.append(elapsed)
            self.admitted_tokens += tokens
            if in_window:
                self.in_window_admitted_tokens += tokens
        elif status == "429":
            self.refusal_latency_s.setdefault(kind or "other", []).append(elapsed)
            if retry_after is not None:
                self.retry_after_s[retry_after] = self.retry_after_s.get(retry_after, 0) + 1


def _wait_until(epoch: float) -> float:
    """Sleep until wall-clock ``epoch``; how late we already were (0 if on time)."""
    late = time.time() - epoch
    if late < 0:
        time.sleep(-late)
    return max(0.0, late)


def hostile_role(args: argparse.Namespace) -> Tally:
    """Tight loops over kept-alive connections; a 429 is answered by sending again at once."""
    split = urlsplit(args.url)
    host, port = split.hostname or "127.0.0.1", split.port or 80
    tally = Tally()
    lock = threading.Lock()
    requests = [
        [
            (post_bytes(host, port, b.data), b.tokens)
            for b in make_bodies(f"hostile-{args.seed}-{c}", 4, args.items, args.vocab_size)
        ]
        for c in range(args.connections)
    ]
    tally.started_late_s = _wait_until(args.start_at)
    offset = time.time() - time.monotonic()
    deadline = args.deadline - offset
    hard_stop = deadline + GRACE_S

    def connection(bodies: list[tuple[bytes, int]]) -> None:
        conn: Connection | None = None
        index = 0
        while time.monotonic() < deadline:
            raw, tokens = bodies[index % len(bodies)]
            index += 1
            try:
                if conn is None:
                    conn = Connection(host, port, timeout_s=5.0)
                    with lock:
                        tally.connects += 1
                started = time.monotonic()
                status, headers, payload = conn.request(raw, hard_stop - started)
            except TimeoutError:
                with lock:
                    tally.unfinished += 1
                break
            except OSError as exc:
                if conn is not None:
                    conn.close()
                conn = None
                with lock:
                    tally.record(type(exc).__name__, 0.0, tokens, True)
                time.sleep(0.01)  # a refused connection must not spin this core
                continue
            ended = time.monotonic()
            kind = refusal_kind(payload) if status == 429 else None
            with lock:
                tally.record(str(status), ended - started, tokens, started < deadline, kind=kind)
            if headers.get("connection", "").lower() == "close":
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=connection, args=(b,), daemon=True) for b in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(0.0, hard_stop + 5 - time.monotonic()))
    return tally


def polite_role(args: argparse.Namespace) -> Tally:
    """Closed loop; a 429 is answered by sleeping its Retry-After and sending the same again.
    Every 200 is checked: one reward per response token sent."""
    import httpx

    tally = Tally()
    bodies = [
        make_bodies(f"polite-{args.seed}-{c}", 16, args.items, args.vocab_size)
        for c in range(args.connections)
    ]
    tally.started_late_s = _wait_until(args.start_at)
    offset = time.time() - time.monotonic()
    deadline = args.deadline - offset
    hard_stop = deadline + GRACE_S
    headers = {"Content-Type": "application/json"}

    async def client(http: httpx.AsyncClient, mine: list[Body]) -> None:
        index = 0
        while time.monotonic() < deadline:
            body = mine[index % len(mine)]
            index += 1
            first = time.monotonic()
            while True:
                started = time.monotonic()
                try:
                    response = await http.post(
                        f"{args.url}/v1/rewards", content=body.data, headers=headers
                    )
                except httpx.HTTPError as exc:
                    tally.record(type(exc).__name__, 0.0, body.tokens, started < deadline)
                    break
                ended = time.monotonic()
                status = response.status_code
                if status == 200:
                    got = tuple(
                        len(r["token_rewards"]) for r in orjson.loads(response.content)["results"]
                    )
                    if got != body.response_lens:
                        raise RuntimeError(f"rewards per item {got} != {body.response_lens}")
                    tally.ok_end_to_end_s.append(ended - first)
                retry_after = response.headers.get("retry-after")
                tally.record(
                    str(status),
                    ended - started,
                    body.tokens,
                    started < deadline,
                    kind=refusal_kind(response.content) if status == 429 else None,
                    retry_after=retry_after,
                )
                if status != 429:
                    break
                wait = float(retry_after) if retry_after and retry_after.isdigit() else 1.0
                if time.monotonic() + wait >= deadline:
                    return  # the retry would come after the deadline: this client is done
                await asyncio.sleep(wait)

    async def run() -> None:
        limits = httpx.Limits(max_connections=args.connections)
        timeout = httpx.Timeout(GRACE_S + args.deadline - time.time(), connect=5.0)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
            tasks = [asyncio.ensure_future(client(http, mine)) for mine in bodies]
            done, pending = await asyncio.wait(tasks, timeout=hard_stop - time.monotonic())
            for task in pending:
                task.cancel()
            tally.unfinished += len(pending)
            for task in done:
                task.result()  # a wrong answer stops the benchmark

    asyncio.run(run())
    return tally


# --- orchestration ---------------------------------------------------------------------------


def scrape(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("tokenreward_"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


class Probe(threading.Thread):
    """GET /healthz every 50 ms on a fresh connection (as a kubelet probe does), until stopped."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        split = urlsplit(url)
        self.host, self.port = split.hostname or "127.0.0.1", split.port or 80
        self.raw = (
            f"GET /healthz HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nConnection: close\r\n\r\n"
        ).encode()
        self.latencies: list[float] = []
        self.failures: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        tick = time.monotonic()
        while not self.stop.is_set():
            started = time.monotonic()
            conn: Connection | None = None
            try:
                conn = Connection(self.host, self.port, timeout_s=10.0)
                status, _, _ = conn.request(self.raw, 10.0)
                if status == 200:
                    self.latencies.append(time.monotonic() - started)
                else:
                    self.failures[str(status)] = self.failures.get(str(status), 0) + 1
            except OSError as exc:
                self.failures[type(exc).__name__] = self.failures.get(type(exc).__name__, 0) + 1
            finally:
                if conn is not None:
                    conn.close()
            tick += PROBE_INTERVAL_S
            self.stop.wait(max(0.0, tick - time.monotonic()))
            tick = max(tick, time.monotonic() - PROBE_INTERVAL_S)  # no burst after a stall


@dataclass
class Group:
    name: str
    key: str
    """Its name in the report: ``polite``, ``big_polite`` or ``hostile``."""
    role: str
    processes: list[subprocess.Popen[bytes]]
    results: list[Path]


def spawn_group(
    name: str,
    key: str,
    role: str,
    count: int,
    *,
    url: str,
    connections: int,
    items: int,
    vocab_size: int,
    start_at: float,
    deadline: float,
    folder: Path,
) -> Group:
    procs, results = [], []
    for index in range(count):
        result = folder / f"{name}-{index}.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--role", role, "--url", url, "--result", str(result),
            "--connections", str(connections), "--items", str(items),
            "--vocab-size", str(vocab_size), "--seed", str(index),
            "--start-at", repr(start_at), "--deadline", repr(deadline),
        ]  # fmt: skip
        procs.append(subprocess.Popen(cmd))
        results.append(result)
    return Group(name, key, role, procs, results)


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """User and system CPU seconds of each thread of ``pid`` (Linux ``/proc``). The thread
    whose id is the process id is the main thread: in ``tokenreward serve``, uvicorn's event
    loop (HTTP, routing, early refusals, answers); the others are the inference thread, torch's
    worker threads and the thread pool that parses request bodies."""
    out: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (task / "stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def group_cpu(group: Group) -> float:
    from tokenreward_service.bench.runner import cpu_seconds

    return sum(cpu_seconds(p.pid) or 0.0 for p in group.processes)


def merge(paths: Sequence[Path]) -> Tally:
    total = Tally()
    for path in paths:
        raw = json.loads(path.read_text())
        part = Tally(**raw)
        total.attempts += part.attempts
        for key, count in part.statuses.items():
            total.statuses[key] = total.statuses.get(key, 0) + count
        total.ok_latency_s += part.ok_latency_s
        total.ok_end_to_end_s += part.ok_end_to_end_s
        for key, values in part.refusal_latency_s.items():
            total.refusal_latency_s.setdefault(key, []).extend(values)
        for key, count in part.retry_after_s.items():
            total.retry_after_s[key] = total.retry_after_s.get(key, 0) + count
        total.offered_tokens += part.offered_tokens
        total.admitted_tokens += part.admitted_tokens
        total.in_window_attempts += part.in_window_attempts
        total.in_window_offered_tokens += part.in_window_offered_tokens
        total.in_window_admitted_tokens += part.in_window_admitted_tokens
        total.connects += part.connects
        total.unfinished += part.unfinished
        total.started_late_s = max(total.started_late_s, part.started_late_s)
    return total


def summarise_group(tally: Tally, window_s: float, cpu_s: float) -> dict[str, Any]:
    refusals = [v for values in tally.refusal_latency_s.values() for v in values]
    ms = 1000.0

    def in_ms(values: Sequence[float]) -> dict[str, float] | None:
        found = percentiles([v * ms for v in values])
        return None if found is None else {k: round(v, 2) for k, v in found.items()}

    return {
        "attempts": tally.attempts,
        "statuses": tally.statuses,
        "attempts_per_s": tally.in_window_attempts / window_s,
        "offered_tokens_per_s": tally.in_window_offered_tokens / window_s,
        "admitted_tokens_per_s": tally.in_window_admitted_tokens / window_s,
        "ok_latency_ms": in_ms(tally.ok_latency_s),
        "ok_end_to_end_ms": in_ms(tally.ok_end_to_end_s),
        "refusals_429": sum(len(v) for v in tally.refusal_latency_s.values()),
        "refusal_latency_ms": in_ms(refusals),
        "refusal_latency_ms_by_kind": {
            kind: in_ms(values) for kind, values in sorted(tally.refusal_latency_s.items())
        },
        "retry_after_s": tally.retry_after_s,
        "connects": tally.connects,
        "unfinished_at_hard_stop": tally.unfinished,
        "started_late_s": tally.started_late_s,
        "cpu_s": cpu_s,
    }


def run_phase(
    name: str,
    *,
    url: str,
    server_pid: int,
    args: argparse.Namespace,
    vocab_size: int,
    big: str | None,
    folder: Path,
    eta: ETA,
) -> dict[str, Any]:
    from tokenreward_service.bench.runner import cpu_seconds, machine_cpu_seconds

    start_at = time.time() + START_DELAY_S
    deadline = start_at + args.seconds
    common = {"url": url, "vocab_size": vocab_size, "start_at": start_at, "deadline": deadline}
    groups = [
        spawn_group(
            f"{name}-polite", "polite", "polite", 1, connections=args.polite_clients, items=8,
            folder=folder, **common,
        )
    ]  # fmt: skip
    if big is not None:
        # The big-body clients: ``hostile`` ignore Retry-After, ``polite`` (the control) honour
        # it; the same processes, connections and bodies either way.
        groups.append(
            spawn_group(
                f"{name}-big", "hostile" if big == "hostile" else "big_polite", big,
                args.hostile_processes, connections=args.hostile_connections,
                items=args.hostile_items, folder=folder, **common,
            )
        )  # fmt: skip
    try:
        time.sleep(max(0.0, start_at - time.time()))
        probe = Probe(url)
        before = scrape(url)
        threads_before = thread_cpu_seconds(server_pid)
        cpu_before = {
            "server": cpu_seconds(server_pid) or 0.0,
            **{g.name: group_cpu(g) for g in groups},
            "machine": machine_cpu_seconds() or 0.0,
            "orchestrator": time.process_time(),
        }
        started = time.monotonic()
        probe.start()
        queue_samples: list[float] = []
        timeline: list[dict[str, float]] = []
        previous, previous_t = before, started
        last_log = started
        while (now := time.monotonic()) < started + args.seconds:
            time.sleep(min(SAMPLE_INTERVAL_S, max(0.0, started + args.seconds - now)))
            sample = scrape(url)
            queue_samples.append(sample.get(QUEUE_TOKENS, 0.0))
            now = time.monotonic()
            timeline.append(
                {
                    "t_s": round(now - started, 3),
                    "dt_s": round(now - previous_t, 3),
                    "real_tokens": sample.get(REAL, 0.0) - previous.get(REAL, 0.0),
                    "forward_s": round(
                        sample.get(INFER_SUM, 0.0) - previous.get(INFER_SUM, 0.0), 3
                    ),
                    "refusals_429": sample.get(REWARDS_STATUS % 429, 0.0)
                    - previous.get(REWARDS_STATUS % 429, 0.0),
                    "queue_tokens": queue_samples[-1],
                }
            )
            previous, previous_t = sample, now
            if time.monotonic() - last_log >= 5.0 or time.monotonic() >= started + args.seconds:
                last_log = time.monotonic()
                elapsed = last_log - started
                real = sample.get(REAL, 0.0) - before.get(REAL, 0.0)
                refused = sample.get(REWARDS_STATUS % 429, 0.0) - before.get(
                    REWARDS_STATUS % 429, 0.0
                )
                _log(
                    f"{name}: {elapsed:4.0f}/{args.seconds:g} s | model {real / elapsed:7,.0f} "
                    f"real tokens/s | queue {queue_samples[-1]:7,.0f} tokens | 429s "
                    f"{refused:8,.0f} | ETA {eta.left(name, elapsed)}"
                )
        after = scrape(url)
        threads_after = thread_cpu_seconds(server_pid)
        cpu_after = {
            "server": cpu_seconds(server_pid) or 0.0,
            **{g.name: group_cpu(g) for g in groups},
            "machine": machine_cpu_seconds() or 0.0,
            "orchestrator": time.process_time(),
        }
        window = time.monotonic() - started
        probe.stop.set()
        probe.join(timeout=15)
        for group in groups:
            for proc in group.processes:
                try:
                    proc.wait(timeout=GRACE_S + 15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                if proc.returncode != 0:
                    raise RuntimeError(f"{group.name} client exited with {proc.returncode}")
    finally:
        for group in groups:
            for proc in group.processes:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    cpu = {key: cpu_after[key] - cpu_before[key] for key in cpu_before}
    clients_cpu = sum(cpu[g.name] for g in groups)
    real, infer = delta(REAL), delta(INFER_SUM)
    loop_thread = threads_after.get(server_pid, 0.0) - threads_before.get(server_pid, 0.0)
    statuses = {
        key.split('status="')[1].rstrip('"}'): int(after[key] - before.get(key, 0.0))
        for key in after
        if key.startswith('tokenreward_requests_total{route="/v1/rewards"')
        and after[key] - before.get(key, 0.0)
    }
    healthz_ms = percentiles([v * 1000 for v in probe.latencies])
    report: dict[str, Any] = {
        "window_s": window,
        "model": {
            "real_tokens": real,
            "real_tokens_per_s": real / window,
            "busy_share": infer / window,
            "real_tokens_per_forward_s": real / infer if infer else None,
            "batches": delta(INFER_COUNT),
            "padded_tokens_per_batch": delta(BATCH_PADDED_SUM) / delta(BATCH_PADDED_COUNT)
            if delta(BATCH_PADDED_COUNT)
            else None,
            "padding_efficiency": real / delta(PADDED) if delta(PADDED) else None,
            "submitted_tokens": delta(SUBMITTED),
        },
        "queue_tokens": {
            "mean": sum(queue_samples) / len(queue_samples) if queue_samples else None,
            "max": max(queue_samples, default=None),
            "bound": args.max_queued_tokens,
        },
        "timeline": timeline,
        "forward_speed_by_refusal_rate": forward_speed_by_refusal_rate(timeline),
        "healthz_probe_ms": None
        if healthz_ms is None
        else {k: round(v, 2) for k, v in healthz_ms.items()},
        "healthz_probe_failures": probe.failures,
        "healthz_probes_over_1s": sum(v > 1.0 for v in probe.latencies),
        "healthz_server_mean_ms": 1000 * delta(HEALTHZ_SUM) / delta(HEALTHZ_COUNT)
        if delta(HEALTHZ_COUNT)
        else None,
        "server_rewards_statuses": statuses,
        "server_event_loop_cpu_ms_per_rewards_request": 1000 * loop_thread / sum(statuses.values())
        if statuses
        else None,
        "cpu_s": {
            "server": cpu["server"],
            "server_event_loop_thread": loop_thread,
            "server_other_threads": cpu["server"] - loop_thread,
            **{g.key: cpu[g.name] for g in groups},
            "orchestrator_and_probe": cpu["orchestrator"],
            "rest_of_machine": cpu["machine"] - cpu["server"] - clients_cpu - cpu["orchestrator"],
            "machine_total": cpu["machine"],
            "machine_capacity": window * (os.cpu_count() or 1),
        },
        "clients": {g.key: summarise_group(merge(g.results), window, cpu[g.name]) for g in groups},
    }
    return report


def forward_speed_by_refusal_rate(timeline: Sequence[dict[str, float]]) -> dict[str, Any]:
    """Real tokens per forward-pass second of the batches that ran during a refusal storm
    (at least 50 429s a second) and of those that ran in quiet (under 5 a second).

    Both counters move when a batch ends, so each sample holds whole batches; the refusal rate
    a batch saw is taken over the samples that cover its forward pass (its ``forward_s``
    back from the sample's end). Batches in between are in neither group.
    """
    groups: dict[str, list[float]] = {"storm": [0.0, 0.0, 0.0], "quiet": [0.0, 0.0, 0.0]}
    for index, sample in enumerate(timeline):
        if sample["forward_s"] <= 0:
            continue
        covered = refused = 0.0
        back = index
        while back >= 0 and covered < sample["forward_s"]:
            covered += timeline[back]["dt_s"]
            refused += timeline[back]["refusals_429"]
            back -= 1
        rate = refused / covered
        group = "storm" if rate >= 50 else "quiet" if rate < 5 else None
        if group is not None:
            groups[group][0] += sample["real_tokens"]
            groups[group][1] += sample["forward_s"]
            groups[group][2] += 1
    return {
        name: {
            "samples": int(count),
            "forward_s": round(forward, 2),
            "real_tokens_per_forward_s": tokens / forward if forward else None,
        }
        for name, (tokens, forward, count) in groups.items()
    }


class ETA:
    """Time left in the whole run, from a plan of the phases still to come."""

    def __init__(self, phases: Sequence[str], seconds: float) -> None:
        self.phases = list(phases)
        self.seconds = seconds
        self.overhead = START_DELAY_S + 9.0  # start-up, in-flight work finishing, drain

    def left(self, phase: str, elapsed: float) -> str:
        later = len(self.phases) - 1 - self.phases.index(phase)
        total = max(0.0, self.seconds - elapsed) + later * (self.seconds + self.overhead) + 5
        return f"{int(total // 60)}:{int(total % 60):02d}"


def wait_for_drain(url: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < DRAIN_TIMEOUT_S:
        if scrape(url).get(QUEUE_TOKENS, 0.0) == 0:
            break
        time.sleep(0.2)
    return time.monotonic() - started


def warm_up(url: str, vocab_size: int) -> None:
    import httpx

    for body in make_bodies("warm-up", 4, 8, vocab_size):
        httpx.post(
            f"{url}/v1/rewards",
            content=body.data,
            headers={"Content-Type": "application/json"},
            timeout=120,
        ).raise_for_status()


def summary_table(report: dict[str, Any]) -> str:
    phases: dict[str, dict[str, Any]] = report["phases"]
    names = list(phases)

    def num(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    def pair(block: dict[str, Any] | None) -> str:
        return "-" if not block else f"{num(block['p50'], 1)} / {num(block['p99'], 1)}"

    def row(label: str, cell: Any) -> tuple[str, ...]:
        cells = []
        for name in names:
            try:
                cells.append(cell(phases[name]))
            except (KeyError, TypeError):
                cells.append("")
        return (label, *cells)

    def polite(p: dict[str, Any]) -> dict[str, Any]:
        return dict(p["clients"]["polite"])

    def hostile(p: dict[str, Any]) -> dict[str, Any]:
        clients = p["clients"]
        return dict(clients["hostile"] if "hostile" in clients else clients["big_polite"])

    rows = [
        row("8-item clients + big-body connections", lambda p: (
            f"{p['settings']['polite_clients']} + {p['settings']['big_body_connections']}"
            + {True: " polite", False: " hostile", None: ""}[
                p["settings"]["big_body_clients_honour_retry_after"]])),
        row("model real tokens/s", lambda p: num(p["model"]["real_tokens_per_s"])),
        row("real tokens per forward-pass second", lambda p: num(
            p["model"]["real_tokens_per_forward_s"])),
        row("  of batches in a 429 storm / in quiet (n)", lambda p: " / ".join(
            f"{num(g['real_tokens_per_forward_s'])} ({g['samples']})"
            for g in (p["forward_speed_by_refusal_rate"][k] for k in ("storm", "quiet")))),
        row("forward-pass busy share", lambda p: num(p["model"]["busy_share"], 3)),
        row("batches, mean padded tokens each", lambda p: (
            f"{num(p['model']['batches'])}, {num(p['model']['padded_tokens_per_batch'])}")),
        row("queue tokens, mean / max", lambda p: (
            f"{num(p['queue_tokens']['mean'])} / {num(p['queue_tokens']['max'])}")),
        row("/healthz probe p50 / p99 ms", lambda p: pair(p["healthz_probe_ms"])),
        row("/healthz probe max ms (failures)", lambda p: (
            f"{num(p['healthz_probe_ms']['max'], 1)} ({sum(p['healthz_probe_failures'].values())})"
        )),
        row("8-item 200s, p50 / p99 ms", lambda p: (
            f"{polite(p)['statuses'].get('200', 0)}: {pair(polite(p)['ok_latency_ms'])}")),
        row("8-item first try to 200, p50 / p99 ms", lambda p: pair(
            polite(p)["ok_end_to_end_ms"])),
        row("8-item admitted tokens/s", lambda p: num(polite(p)["admitted_tokens_per_s"])),
        row("8-item 429s", lambda p: num(polite(p)["refusals_429"])),
        row("big-body attempts/s", lambda p: num(hostile(p)["attempts_per_s"])),
        row("big-body offered tokens/s", lambda p: num(hostile(p)["offered_tokens_per_s"])),
        row("big-body 200s, p50 / p99 ms", lambda p: (
            f"{hostile(p)['statuses'].get('200', 0)}: {pair(hostile(p)['ok_latency_ms'])}")),
        row("big-body admitted tokens/s", lambda p: num(hostile(p)["admitted_tokens_per_s"])),
        row("big-body 429s, p50 / p99 ms", lambda p: (
            f"{hostile(p)['refusals_429']:,}: {pair(hostile(p)['refusal_latency_ms'])}")),
    ]  # fmt: skip
    kinds = sorted(
        {k for p in phases.values() if len(p["clients"]) > 1
         for k in hostile(p)["refusal_latency_ms_by_kind"]}
    )  # fmt: skip
    for kind in kinds:
        rows.append(
            row(
                f"  429 {kind}, p50 / p99 ms",
                lambda p, kind=kind: (
                    f"{hostile(p)['refusal_latency_ms_by_kind'][kind]['n']:,}: "
                    f"{pair(hostile(p)['refusal_latency_ms_by_kind'][kind])}"
                ),
            )
        )
    for label, key in (
        ("CPU s: server", "server"),
        ("  server event-loop thread", "server_event_loop_thread"),
        ("  server other threads (model, parsing)", "server_other_threads"),
        ("CPU s: 8-item client process", "polite"),
        ("CPU s: big-body client processes, polite", "big_polite"),
        ("CPU s: big-body client processes, hostile", "hostile"),
        ("CPU s: this process and probe", "orchestrator_and_probe"),
        ("CPU s: rest of machine", "rest_of_machine"),
        ("CPU s: capacity (window x cores)", "machine_capacity"),
    ):
        rows.append(row(label, lambda p, key=key: num(p["cpu_s"][key], 1)))
    rows.append(
        row(
            "server event-loop CPU ms per /v1/rewards answer",
            lambda p: num(p["server_event_loop_cpu_ms_per_rewards_request"], 2),
        )
    )
    widths = [max(len(r[i]) for r in [("", *names), *rows]) for i in range(len(names) + 1)]
    lines = []
    for r in [("", *names), *rows]:
        lines.append(
            "  ".join(
                cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                for i, cell in enumerate(r)
            )
        )
    return "\n".join(lines)


def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from tokenreward_service.bench.runner import (
        BENCH_MODEL_SIZES,
        build_bench_model,
        peak_rss_mb,
        spawn_server,
    )

    plan: list[tuple[str, str | None]] = [("baseline", None)]
    if not args.no_control:
        plan.append(("control", "polite"))
    plan.append(("hostile", "hostile"))
    eta = ETA([name for name, _ in plan], args.seconds)
    folder = build_bench_model(Path(tempfile.gettempdir()) / "tokenreward-bench-model")
    serve_args = ["--model", str(folder), "--max-queued-tokens", str(args.max_queued_tokens)]
    _log(f"starting tokenreward serve {' '.join(serve_args)}")
    with (
        spawn_server(serve_args) as server,
        tempfile.TemporaryDirectory(prefix="tokenreward-hostile-") as tmp,
    ):
        info = httpx.get(f"{server.url}/v1/model", timeout=30).json()
        vocab_size = int(info["vocab_size"])
        warm_up(server.url, vocab_size)
        sizes = {
            "polite_body": make_bodies("size", 1, 8, vocab_size)[0],
            "hostile_body": make_bodies("size", 1, args.hostile_items, vocab_size)[0],
        }
        report: dict[str, Any] = {
            "command": " ".join(["benchmarks/hostile_overload.py", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
            "model": {"path": str(folder), **BENCH_MODEL_SIZES, "device": info["device"]},
            "server_flags": serve_args[2:],
            "settings": {
                "seconds": args.seconds,
                "polite_clients": args.polite_clients,
                "control_phase": not args.no_control,
                "polite_items": 8,
                "hostile_processes": args.hostile_processes,
                "hostile_connections_per_process": args.hostile_connections,
                "hostile_items": args.hostile_items,
                "probe_interval_s": PROBE_INTERVAL_S,
                **{
                    f"{name}_bytes_tokens": [len(body.data), body.tokens]
                    for name, body in sizes.items()
                },
            },
            "phases": {},
        }
        for name, big in plan:
            _log(
                f"{name}: {args.seconds:g} s, {args.polite_clients} polite clients"
                + (
                    f" + {args.hostile_processes} x {args.hostile_connections} {big} "
                    f"connections sending {args.hostile_items} items"
                    if big
                    else ""
                )
                + f" (ETA {eta.left(name, -START_DELAY_S)})"
            )
            phase = run_phase(
                name,
                url=server.url,
                server_pid=server.process.pid,
                args=args,
                vocab_size=vocab_size,
                big=big,
                folder=Path(tmp),
                eta=eta,
            )
            phase["sizes"] = {
                "polite_body_tokens": sizes["polite_body"].tokens,
                "big_body_tokens": sizes["hostile_body"].tokens,
            }
            phase["settings"] = {
                "polite_clients": args.polite_clients,
                "big_body_connections": args.hostile_processes * args.hostile_connections
                if big
                else 0,
                "big_body_clients_honour_retry_after": big == "polite" if big else None,
            }
            phase["drain_s"] = wait_for_drain(server.url)
            report["phases"][name] = phase
        report["server_peak_rss_mb"] = peak_rss_mb(server.process.pid)
    report["targets"] = targets(report["phases"])
    return report


def outstanding(phase: dict[str, Any]) -> float:
    """Tokens the phase's clients try to keep in the server at once: one body per connection."""
    polite = phase["settings"]["polite_clients"] * phase["sizes"]["polite_body_tokens"]
    return float(
        polite + phase["settings"]["big_body_connections"] * phase["sizes"]["big_body_tokens"]
    )


def targets(phases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The project's targets under hostile load, against the baseline (and the deep-queue
    control: the same clients and bodies as the hostile phase, honouring Retry-After)."""
    base, bad = phases["baseline"]["model"], phases["hostile"]["model"]
    probe = phases["hostile"]["healthz_probe_ms"] or {}
    out: dict[str, Any] = {
        "throughput_ratio": bad["real_tokens_per_s"] / base["real_tokens_per_s"],
        "throughput_ratio_met": bad["real_tokens_per_s"] >= 0.8 * base["real_tokens_per_s"],
        "forward_speed_ratio": bad["real_tokens_per_forward_s"] / base["real_tokens_per_forward_s"],
        "outstanding_work_multiple": outstanding(phases["hostile"])
        / outstanding(phases["baseline"]),
        "offered_multiple": sum(
            c["offered_tokens_per_s"] for c in phases["hostile"]["clients"].values()
        )
        / base["real_tokens_per_s"],
        "healthz_p99_ms": probe.get("p99"),
        "healthz_p99_met": probe.get("p99", float("inf")) < 100.0,
    }
    if "control" in phases:
        deep = phases["control"]["model"]
        out["throughput_ratio_vs_control"] = bad["real_tokens_per_s"] / deep["real_tokens_per_s"]
        out["forward_speed_ratio_vs_control"] = (
            bad["real_tokens_per_forward_s"] / deep["real_tokens_per_forward_s"]
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    parser.add_argument("--hostile-processes", type=int, default=2)
    parser.add_argument("--hostile-connections", type=int, default=2, help="per process")
    parser.add_argument("--hostile-items", type=int, default=88, help="items per hostile body")
    parser.add_argument("--polite-clients", type=int, default=4)
    parser.add_argument(
        "--no-control",
        action="store_true",
        help="skip the control phase (the hostile phase's clients, honouring Retry-After)",
    )
    parser.add_argument("--max-queued-tokens", type=int, default=65536)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    # A client process, started by the orchestrator (not for use by hand).
    parser.add_argument("--role", choices=["polite", "hostile"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--connections", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--items", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--vocab-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role is not None:
        if not (args.url or "").startswith("http://127.0.0.1:"):
            raise SystemExit("client roles talk to 127.0.0.1 only")
        tally = hostile_role(args) if args.role == "hostile" else polite_role(args)
        args.result.write_text(json.dumps(tally.__dict__))
        return
    report = orchestrate(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(summary_table(report))
    t = report["targets"]
    print(
        f"\nhostile / baseline model throughput {t['throughput_ratio']:.3f} (target >= 0.80: "
        f"{'met' if t['throughput_ratio_met'] else 'NOT met'})"
        + (
            f"; hostile / control {t['throughput_ratio_vs_control']:.3f}"
            if "throughput_ratio_vs_control" in t
            else ""
        )
        + f"\n/healthz p99 under hostile load {num_or_dash(t['healthz_p99_ms'])} ms (target < 100: "
        f"{'met' if t['healthz_p99_met'] else 'NOT met'})\n"
        f"the hostile phase's clients keep {t['outstanding_work_multiple']:.1f}x the baseline's "
        f"tokens in flight, and with no back-off offer {t['offered_multiple']:,.0f}x its model "
        "throughput in tokens/s\n"
        "clients and server share this machine's cores: read the CPU rows before blaming the "
        f"server\nreport: {args.out}"
    )


def num_or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


if __name__ == "__main__":
    main()
