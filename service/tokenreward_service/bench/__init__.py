"""``tokenreward bench``: throughput and latency of the service against its in-process ceiling.

Without ``--url`` the benchmark builds its own model (a random-weight Llama RM, see
:data:`~tokenreward_service.bench.runner.BENCH_MODEL_SIZES`), starts servers on 127.0.0.1 and
runs every comparison: the service against the ceiling, per-request batching (``--batching
off``), shared prompts against full scoring, naive per-prefix recomputation, latency at half
the saturated load, and peak memory on long sequences. With ``--url`` it measures that server
only. Every figure is the median of ``--runs`` runs.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tokenreward_service.bench.runner import (
    BENCH_MODEL_SIZES,
    build_bench_model,
    cpu_count,
    naive_ratio,
    peak_rss_mb,
    run_inprocess,
    run_service,
    spawn_server,
)
from tokenreward_service.bench.workloads import WORKLOADS, Workload, make_workload

__all__ = ["main_bench"]


_COMPARISONS: dict[str, tuple[str, list[str], str]] = {
    "mixed": ("batching_off", ["--batching", "off"], "batching_speedup"),
    "group": ("no_sharing", ["--share-prompts", "false"], "sharing_speedup"),
}
"""Per workload: (report key, server flags, speedup key) of the mode the service is compared
with: each request's items batched alone, and every item scored in full."""


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every numeric figure across runs (latency percentiles included)."""
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in runs)
        elif (
            isinstance(value, dict) and value and all(isinstance(v, float) for v in value.values())
        ):
            out[key] = {k: statistics.median(r[key][k] for r in runs) for k in value}
        else:
            out[key] = value
    out["errors"] = {k: sum(r["errors"].get(k, 0) for r in runs) for r in runs for k in r["errors"]}
    return out


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _service(url: str, workload: Workload, runs: int, api_key: str | None = None) -> dict[str, Any]:
    return _median([run_service(url, workload, api_key=api_key) for _ in range(runs)])


def main_bench(
    *,
    workloads: list[str],
    runs: int,
    scale: float,
    url: str | None,
    api_key: str | None,
    model: str | None,
    max_batch_tokens: int,
    out: str | None,
) -> dict[str, Any]:
    from tokenreward_service.loading import load_reward_model

    report: dict[str, Any] = {
        "machine": {
            "cpus": cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
        },
        "runs": runs,
        "scale": scale,
        "max_batch_tokens": max_batch_tokens,
        "workloads": {},
    }
    if url is not None:
        info = (
            __import__("httpx")
            .get(
                f"{url}/v1/model", headers={"Authorization": f"Bearer {api_key}"} if api_key else {}
            )
            .json()
        )
        for name in workloads:
            workload = make_workload(name, vocab_size=int(info["vocab_size"]), scale=scale)
            _log(f"{name}: {len(workload.items)} items, {workload.tokens} tokens against {url}")
            report["workloads"][name] = {"service": _service(url, workload, runs, api_key)}
        _emit(report, out)
        return report

    folder = (
        Path(model)
        if model
        else build_bench_model(Path(tempfile.gettempdir()) / "tokenreward-bench-model")
    )
    report["model"] = {"path": str(folder), **({} if model else BENCH_MODEL_SIZES)}
    serve_args = ["--model", str(folder), "--max-batch-tokens", str(max_batch_tokens)]
    in_process = load_reward_model(folder)
    report["model"].update(device=in_process.spec.device, dtype=in_process.spec.dtype)
    vocab = in_process.spec.vocab_size
    for name in workloads:
        workload = make_workload(name, vocab_size=vocab, scale=scale)
        _log(f"{name}: {len(workload.items)} items, {workload.tokens} tokens")
        result: dict[str, Any] = {"items": len(workload.items), "tokens": workload.tokens}
        with spawn_server(serve_args) as spawned:
            server = spawned.url
            result["service"] = _service(server, workload, runs)
            result["server_peak_rss_mb"] = peak_rss_mb(spawned.process.pid)
            if name == "mixed":
                saturated = result["service"]["items_per_s"] / 8  # requests/s
                result["half_load"] = _median(
                    [run_service(server, workload, rate=saturated / 2, seed=s) for s in range(runs)]
                )
                result["half_load"]["rate_requests_per_s"] = saturated / 2
        ceiling = [
            run_inprocess(
                in_process, workload, max_batch_tokens=max_batch_tokens, max_batch_size=256
            )
            for _ in range(runs)
        ]
        result["inprocess_ceiling"] = _median([{**c, "errors": {}} for c in ceiling])
        result["service_vs_ceiling"] = (
            result["service"]["tokens_per_s"] / result["inprocess_ceiling"]["tokens_per_s"]
        )
        if name in _COMPARISONS:
            key, flags, speedup = _COMPARISONS[name]
            _log(f"{name}: the same server with {' '.join(flags)}")
            with spawn_server([*serve_args, *flags]) as spawned:
                result[key] = _service(spawned.url, workload, runs)
            result[speedup] = result["service"]["tokens_per_s"] / result[key]["tokens_per_s"]
        report["workloads"][name] = result
    _log("naive per-prefix recomputation on a 256-token response")
    report["naive_per_prefix"] = naive_ratio(in_process)
    _emit(report, out)
    return report


def _emit(report: dict[str, Any], out: str | None) -> None:
    text = json.dumps(report, indent=2, sort_keys=False)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def known_workloads(value: str) -> list[str]:
    if value == "all":
        return list(WORKLOADS)
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workload(s) {unknown}; known: {', '.join(WORKLOADS)} or all")
    return names
