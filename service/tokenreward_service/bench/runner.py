"""Measure a workload through a running server, and the in-process ceiling on the same items.

The service measurement drives real HTTP from ``concurrency`` clients and reads the server's
own ``/metrics`` before and after, so padding efficiency and shared-prompt hits are what the
server really computed. The ceiling runs the same items through the same model in this process
with ideal batching (sorted, the same token budget), with no HTTP, JSON or queueing at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import torch

from tokenreward import binary
from tokenreward.protocol import RewardRequest
from tokenreward_service.bench.workloads import Workload
from tokenreward_service.model import RewardModel
from tokenreward_service.redistribution import redistribute

__all__ = [
    "BENCH_MODEL_SIZES",
    "SpawnedServer",
    "build_bench_model",
    "check_reward_counts",
    "cpu_seconds",
    "ideal_batches",
    "machine_cpu_seconds",
    "naive_ratio",
    "request_bodies",
    "run_inprocess",
    "run_service",
    "spawn_server",
    "stop_process",
]

BENCH_MODEL_SIZES: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 256,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 4,
    "intermediate_size": 688,
    "max_positions": 4096,
}
"""A Llama RM big enough that the forward pass dominates on a CPU, as it does on a GPU."""


def build_bench_model(folder: Path, **sizes: Any) -> Path:
    """Save the random-weight benchmark RM to ``folder`` (once; reused when it is there)."""
    from tokenreward_service.tiny import save_tiny_reward_model

    if not (folder / "config.json").is_file():
        save_tiny_reward_model(folder, "llama", seed=0, **{**BENCH_MODEL_SIZES, **sizes})
    return folder


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


def _scrape(url: str, headers: dict[str, str]) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("tokenreward_") and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def request_bodies(workload: Workload) -> list[dict[str, Any]]:
    """The JSON bodies of the workload's requests, as :func:`run_service` sends them."""
    extra: dict[str, Any] = {}
    if workload.policy_tokenizer is not None:
        extra["policy_tokenizer"] = workload.policy_tokenizer
    return [
        {"items": [{"prompt_ids": p, "response_ids": r} for p, r in request], **extra}
        for request in workload.requests
    ]


def check_reward_counts(
    request: Sequence[tuple[list[int], list[int]]], body: bytes, encoding: str = "json"
) -> None:
    """One reward per response token sent (the policy's tokens for a policy workload): a
    benchmark of wrong answers measures nothing, so a mismatch stops it."""
    if encoding == "binary":
        got = [len(r.token_rewards) for r in binary.decode_response(body).results]
    else:
        got = [len(result["token_rewards"]) for result in orjson.loads(body)["results"]]
    sent = [len(response) for _, response in request]
    if got != sent:
        raise RuntimeError(f"rewards per item {got} != response tokens sent {sent}")


def run_service(
    url: str,
    workload: Workload,
    *,
    api_key: str | None = None,
    rate: float | None = None,
    seed: int = 0,
    check_rewards: bool = False,
    server_pid: int | None = None,
    encoding: str = "json",
) -> dict[str, Any]:
    """Send ``workload`` to ``url``: closed loop from ``workload.concurrency`` clients, or open
    loop at ``rate`` requests/s (Poisson arrivals) for a latency measurement under load.
    ``encoding`` ``"binary"`` sends and asks for the binary encoding instead of JSON.

    ``check_rewards`` parses every answer and raises unless each item has one reward per
    response token sent (it also reports the answers' size); ``server_pid`` adds the server
    process's CPU seconds over the run.
    """
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    scrape = dict(headers)
    before = _scrape(url, scrape)
    if encoding == "binary":  # both ways (tokenreward.binary)
        bodies = [
            binary.encode_request(RewardRequest.model_validate(body))
            for body in request_bodies(workload)
        ]
        headers = {**headers, "Content-Type": binary.MEDIA_TYPE, "Accept": binary.MEDIA_TYPE}
    else:
        bodies = [orjson.dumps(body) for body in request_bodies(workload)]
    cpu_before = None if server_pid is None else cpu_seconds(server_pid)
    machine_before, own_before = machine_cpu_seconds(), time.process_time()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    received = [0]

    async def send(client: httpx.AsyncClient, index: int) -> None:
        started = time.perf_counter()
        try:
            response = await client.post(
                f"{url}/v1/rewards", content=bodies[index], headers=headers
            )
            status = str(response.status_code)
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        if status == "200":
            latencies.append(time.perf_counter() - started)
            if check_rewards:
                check_reward_counts(workload.requests[index], response.content, encoding)
                received[0] += len(response.content)
        else:
            errors[status] = errors.get(status, 0) + 1

    async def closed_loop() -> None:
        queue = list(reversed(range(len(bodies))))
        limits = httpx.Limits(max_connections=workload.concurrency)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:

            async def worker() -> None:
                while queue:
                    await send(client, queue.pop())

            await asyncio.gather(*(worker() for _ in range(workload.concurrency)))

    async def open_loop(per_second: float) -> None:
        rng = __import__("random").Random(seed)
        async with httpx.AsyncClient(
            timeout=600, limits=httpx.Limits(max_connections=256)
        ) as client:
            tasks = []
            for index in range(len(bodies)):
                tasks.append(asyncio.ensure_future(send(client, index)))
                await asyncio.sleep(rng.expovariate(per_second))
            await asyncio.gather(*tasks)

    started = time.perf_counter()
    asyncio.run(closed_loop() if rate is None else open_loop(rate))
    elapsed = time.perf_counter() - started
    after = _scrape(url, scrape)
    cpu_after = None if server_pid is None else cpu_seconds(server_pid)
    machine_after, own_after = machine_cpu_seconds(), time.process_time()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    real = delta('tokenreward_tokens_total{kind="real"}')
    padded = delta('tokenreward_tokens_total{kind="padded"}')
    items = len(workload.items)
    return {
        "tokens_per_s": workload.tokens / elapsed,
        "items_per_s": items / elapsed,
        "seconds": elapsed,
        "latency_s": _percentiles(latencies) if latencies else None,
        "padding_efficiency": real / padded if padded else None,
        "shared_prompt_items": delta("tokenreward_shared_prompt_items_total"),
        "computed_share": real / delta('tokenreward_tokens_total{kind="submitted"}')
        if real
        else None,
        "batches": delta("tokenreward_batch_size_count"),
        # Share of the wall time the model was computing: what is left is HTTP, JSON,
        # queueing and scheduling (and clients not sending).
        "model_busy_share": delta("tokenreward_inference_duration_seconds_sum") / elapsed,
        **(
            {"response_kb_per_item": received[0] / 1024 / items}
            if check_rewards and received[0]
            else {}
        ),
        **_cpu_split(
            (cpu_before, cpu_after), (machine_before, machine_after), own_after - own_before
        ),
        "errors": errors,
    }


def ideal_batches(workload: Workload, budget: int, cap: int) -> list[list[int]]:
    """Every item known in advance, sorted by length and packed greedily under the padded-token
    budget and the size cap. Items that share a prompt are one unit, placed by its longest item
    and never split unless it alone exceeds a batch (the engine computes their prompt once)."""
    items = workload.items

    def length(index: int) -> int:
        return len(items[index][0]) + len(items[index][1])

    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for index, (prompt, _) in enumerate(items):
        by_prompt.setdefault(tuple(prompt), []).append(index)
    units = sorted(
        (sorted(unit, key=length) for unit in by_prompt.values()),
        key=lambda unit: length(unit[-1]),
    )

    def fits(batch: list[int], more: list[int]) -> bool:
        longest = max(length(i) for i in (*batch, *more))
        count = len(batch) + len(more)
        return longest * count <= budget and count <= cap

    batches: list[list[int]] = []
    current: list[int] = []
    for unit in units:
        if current and not fits(current, unit):
            batches.append(current)
            current = []
        for index in unit:  # whole, unless the unit alone is larger than a batch
            if current and not fits(current, [index]):
                batches.append(current)
                current = []
            current.append(index)
    if current:
        batches.append(current)
    return batches


def run_inprocess(
    model: RewardModel, workload: Workload, *, max_batch_tokens: int, max_batch_size: int
) -> dict[str, Any]:
    """The ceiling: the same items, ideally batched, through the model and the math only."""
    items = workload.items
    batches = ideal_batches(workload, max_batch_tokens, max_batch_size)
    started = time.perf_counter()
    real_tokens = 0
    for batch in batches:
        sequences = [items[i][0] + items[i][1] for i in batch]
        prompt_lens = [len(items[i][0]) for i in batch]
        scored = model.score_batch(sequences, prompt_lens)
        real_tokens += scored.real_tokens
        width = max(map(len, sequences))
        padded = torch.zeros((len(batch), width))
        for row, scores in enumerate(scored.scores):
            padded[row, : scores.shape[0]] = scores
        redistribute(
            padded,
            torch.tensor(prompt_lens),
            torch.tensor([len(items[i][1]) for i in batch]),
            torch.tensor([len(s) for s in sequences]),
        ).token_rewards.tolist()
    elapsed = time.perf_counter() - started
    return {
        "tokens_per_s": workload.tokens / elapsed,
        "items_per_s": len(items) / elapsed,
        "seconds": elapsed,
        "batches": len(batches),
        "computed_share": real_tokens / max(1, workload.tokens),
    }


def naive_ratio(
    model: RewardModel, *, prompt_len: int = 128, response_len: int = 256
) -> dict[str, float]:
    """One forward per prefix (the O(T) baseline) against one forward for all prefixes."""
    generator = torch.Generator().manual_seed(0)
    sequence = torch.randint(
        0, model.spec.vocab_size, (prompt_len + response_len,), generator=generator
    ).tolist()
    started = time.perf_counter()
    model.score([sequence])
    one_pass = time.perf_counter() - started
    started = time.perf_counter()
    for t in range(1, response_len + 1):
        model.score([sequence[: prompt_len + t]])
    per_prefix = time.perf_counter() - started
    return {"one_pass_s": one_pass, "per_prefix_s": per_prefix, "speedup": per_prefix / one_pass}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident set (Linux ``VmHWM``), in MiB."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


@dataclass(frozen=True)
class SpawnedServer:
    url: str
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def spawn_server(
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    api_key: str | None = None,
    ready_timeout_s: float = 300.0,
    program: Sequence[str] = ("tokenreward_service.cli", "serve"),
) -> Iterator[SpawnedServer]:
    """``tokenreward serve ARGS`` on a free port of 127.0.0.1, once ``/readyz`` answers 200.

    ``env`` is added to this process's environment; ``api_key`` is sent to ``/readyz`` when
    the server requires one; ``program`` is the module (and its arguments) to run instead of
    ``tokenreward serve``. Its output goes to a temporary file (never a pipe that could fill
    and block it), whose end is in the error if it exits before it is ready. SIGTERM on exit.
    """
    port = _free_port()
    cmd = [sys.executable, "-m", *program, "--port", str(port)]
    cmd += ["--log-level", "warning", "--shutdown-delay-s", "0", *args]  # args may override
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            cmd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + ready_timeout_s
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    output = log.read().decode(errors="replace")[-4000:]
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{output}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/readyz", headers=headers, timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server did not become ready in {ready_timeout_s} s")
                time.sleep(0.1)
            yield SpawnedServer(url, proc)
        finally:
            stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """SIGTERM, and SIGKILL if it has not exited after ``timeout_s``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_seconds(pid: int) -> float | None:
    """User and system CPU time of process ``pid`` so far, all threads (Linux ``/proc``)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return None


def machine_cpu_seconds() -> float | None:
    """CPU seconds every process on the machine has used since boot (Linux ``/proc/stat``:
    user, nice, system, irq and softirq time of all cores)."""
    with contextlib.suppress(OSError, ValueError):
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in first[1:8])
        return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
    return None


def _cpu_split(
    server: tuple[float | None, float | None],
    machine: tuple[float | None, float | None],
    own_s: float,
) -> dict[str, float]:
    """The server's CPU seconds over a run, and those of every process but the server and this
    one: on a shared machine the second says whether something else took cores from the run
    (a few tenths of a second is the kernel and the idle system)."""
    if server[0] is None or server[1] is None:
        return {}
    out = {"server_cpu_s": server[1] - server[0]}
    if machine[0] is not None and machine[1] is not None:
        out["other_processes_cpu_s"] = machine[1] - machine[0] - out["server_cpu_s"] - own_s
    return out


def median_of(runs: Sequence[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def cpu_count() -> int:
    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
