"""``tokenreward bench``: throughput and latency of the service against its in-process ceiling.

Without ``--url`` the benchmark builds its own model (a random-weight Llama RM, see
:data:`~tokenreward_service.bench.runner.BENCH_MODEL_SIZES`), starts servers on 127.0.0.1 and
runs every comparison: the service against the ceiling, per-request batching (``--batching
off``), shared prompts against full scoring, naive per-prefix recomputation, latency at half
the saturated load, and peak memory on long sequences. With ``--url`` it measures that server
only. Every figure is the median of ``--runs`` runs.

``mixed-policy`` (opt-in, not part of ``all``) measures the policy-tokenizer path: the same
texts sent as the policy's (Llama 3.2) token IDs against the RM's own IDs, through one server
(:mod:`tokenreward_service.bench.policy`).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tokenreward_service.bench.policy import (
    POLICY_NAME,
    RM_TOKENIZER_LABEL,
    BenchUnavailable,
    add_demo_tokenizer,
    check_available,
    make_policy_workloads,
    policy_tokenizer_folder,
    policy_tokenizer_label,
    prepare_seconds,
)
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
from tokenreward_service.bench.workloads import (
    OPT_IN_WORKLOADS,
    WORKLOADS,
    Workload,
    make_workload,
)

__all__ = ["BenchUnavailable", "known_workloads", "main_bench"]


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


def _model_info_when_ready(
    url: str, api_key: str | None, timeout_s: float = 600.0
) -> dict[str, Any]:
    """``GET /v1/model`` once ``/readyz`` answers 200: a server opens its listener before its
    model is loaded, and a load generator started with it must wait, not fail."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout_s
    waited = False
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} was not ready within {timeout_s:g} s")
        if not waited:
            _log(f"waiting for {url} to be ready")
            waited = True
        time.sleep(1.0)
    response = httpx.get(f"{url}/v1/model", headers=headers, timeout=30)
    response.raise_for_status()
    info: dict[str, Any] = response.json()
    return info


def _clients(
    workload: Workload, concurrency: int | None, request_items: int | None = None
) -> Workload:
    """``workload`` sent by ``concurrency`` closed-loop clients instead of its own number, in
    requests of ``request_items`` items instead of its own (the same items, in order)."""
    if concurrency is not None:
        workload = dataclasses.replace(workload, concurrency=concurrency)
    if request_items is not None:
        items = workload.items
        requests = [items[i : i + request_items] for i in range(0, len(items), request_items)]
        workload = dataclasses.replace(workload, requests=requests)
    return workload


def _service(
    url: str,
    workload: Workload,
    runs: int,
    api_key: str | None = None,
    encoding: str = "json",
) -> dict[str, Any]:
    return _median(
        [run_service(url, workload, api_key=api_key, encoding=encoding) for _ in range(runs)]
    )


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
    simulated_device: list[float] | None = None,
    encoding: str = "json",
    concurrency: int | None = None,
    request_items: int | None = None,
    engine_process: str = "on",
) -> dict[str, Any]:
    from tokenreward_service.loading import load_reward_model

    if "mixed-policy" in workloads:
        if url is not None:
            raise BenchUnavailable(
                "the mixed-policy workload starts its own server (it needs the RM's tokenizer "
                "here and the policy tokenizer loaded there); leave out --url"
            )
        check_available(model)
    report: dict[str, Any] = {
        "machine": {
            "cpus": cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
        },
        "runs": runs,
        "scale": scale,
        "max_batch_tokens": max_batch_tokens,
        "encoding": encoding,
        "concurrency": concurrency,
        "request_items": request_items,
        "workloads": {},
    }
    if simulated_device:
        report["simulated_device"] = _simulated(
            simulated_device,
            workloads,
            runs=runs,
            scale=scale,
            max_batch_tokens=max_batch_tokens,
            encoding=encoding,
            concurrency=concurrency,
            request_items=request_items,
            engine_process=engine_process,
        )
        _emit(report, out)
        return report
    if url is not None:
        info = _model_info_when_ready(url, api_key)
        for name in workloads:
            workload = _clients(
                make_workload(name, vocab_size=int(info["vocab_size"]), scale=scale),
                concurrency,
                request_items,
            )
            _log(f"{name}: {len(workload.items)} items, {workload.tokens} tokens against {url}")
            report["workloads"][name] = {
                "service": _service(url, workload, runs, api_key, encoding=encoding)
            }
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
        if name == "mixed-policy":
            report["workloads"][name] = _mixed_policy(
                Path(model) if model else None,
                vocab_size=vocab,
                suffix_ids=in_process.spec.suffix_ids,
                runs=runs,
                scale=scale,
                max_batch_tokens=max_batch_tokens,
            )
            continue
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
    if any(name in WORKLOADS for name in workloads):
        _log("naive per-prefix recomputation on a 256-token response")
        report["naive_per_prefix"] = naive_ratio(in_process)
    _emit(report, out)
    return report


SIMULATED_SECONDS = 10.0
"""A simulated run lasts at least this long at the device's rate: workloads are scaled up.
The start of a closed-loop run (the first batches wait for the first requests) and its end
(the last requests drain a shallow queue) cost a fixed time; over 10 s they weigh less than
over 3 s, so the figure is nearer what the host path sustains."""


def _simulated(
    rates: list[float],
    workloads: list[str],
    *,
    runs: int,
    scale: float,
    max_batch_tokens: int,
    encoding: str = "json",
    concurrency: int | None = None,
    request_items: int | None = None,
    engine_process: str = "on",
) -> dict[str, Any]:
    """The real app and batcher in their own process around :class:`SimulatedDevice` (an
    engine that waits ``padded tokens / rate``), loaded from a separate client process: what
    the host path sustains in front of a device of each speed. Labelled as a simulation."""
    results: dict[str, Any] = {
        "label": "SIMULATED DEVICE: no model runs; each batch waits padded tokens / rate",
        "engine_process": engine_process,
        "rates": {},
    }
    started, done, total = time.perf_counter(), 0, len(rates) * len(workloads)
    for rate in rates:
        program = ["tokenreward_service.bench.simulated", "--rate", repr(rate)]
        program += ["--max-batch-tokens", str(max_batch_tokens)]
        program += ["--engine-process", engine_process]
        entry: dict[str, Any] = {}
        with spawn_server([], program=program) as spawned:
            for name in workloads:
                base = make_workload(name, vocab_size=32000, scale=1.0)
                grow = max(scale, SIMULATED_SECONDS * rate / base.tokens)
                workload = _clients(
                    make_workload(name, vocab_size=32000, scale=grow), concurrency, request_items
                )
                service = _service(spawned.url, workload, runs, encoding=encoding)
                entry[name] = {
                    "items": len(workload.items),
                    "tokens": workload.tokens,
                    "service": service,
                    "ratio_to_device": service["tokens_per_s"] / rate,
                }
                done += 1
                eta = (time.perf_counter() - started) / done * (total - done)
                _log(
                    f"simulated {rate:,.0f} tokens/s, {name}: service "
                    f"{service['tokens_per_s']:,.0f} tokens/s "
                    f"({service['tokens_per_s'] / rate:.2f} of the device), "
                    f"padding efficiency {service['padding_efficiency']:.2f}; "
                    f"{done}/{total} done, ETA {eta:.0f} s"
                )
        results["rates"][f"{rate:g}"] = entry
    return results


def _mixed_policy(
    model: Path | None,
    *,
    vocab_size: int,
    suffix_ids: tuple[int, ...],
    runs: int,
    scale: float,
    max_batch_tokens: int,
) -> dict[str, Any]:
    """The same texts through one server as RM token IDs and as policy token IDs.

    One server serves both paths, and the runs alternate which path goes first, so that the
    ratio is not skewed by the server warming up or the machine drifting; throughput is in RM
    tokens for both. ``model`` is an RM folder with its own tokenizer, or ``None`` for the
    benchmark RM with the demo RM's tokenizer copied beside it (its own folder, so that the
    other workloads' servers load no tokenizer).
    """
    from tokenreward_service.conversations import Preparer, load_tokenizer
    from tokenreward_service.tokentext import TokenText

    policy_folder = policy_tokenizer_folder()
    if model is None:
        folder = build_bench_model(Path(tempfile.gettempdir()) / "tokenreward-bench-model-policy")
        add_demo_tokenizer(folder)
        rm_label = RM_TOKENIZER_LABEL
    else:
        folder, rm_label = model, f"the tokenizer in {model}"
    rm_tokenizer = load_tokenizer(folder)
    policy_tokenizer = load_tokenizer(policy_folder)
    twins = make_policy_workloads(
        rm_tokenizer, policy_tokenizer, vocab_size=vocab_size, scale=scale
    )
    paths = {"id_path": twins.rm, "policy_path": twins.policy}
    _log(
        f"mixed-policy: {len(twins.rm.items)} items of real text, {twins.rm.tokens} RM tokens "
        f"({twins.policy_tokens} {POLICY_NAME} tokens), {runs} run(s) of each path"
    )
    preparer = Preparer(
        vocab_size=vocab_size,
        suffix_ids=suffix_ids,
        rm=TokenText(rm_tokenizer, "rm"),
        policies={POLICY_NAME: TokenText(policy_tokenizer, POLICY_NAME)},
    )
    prepare = {key: [prepare_seconds(preparer, w) for _ in range(runs)] for key, w in paths.items()}
    serve_args = ["--model", str(folder), "--max-batch-tokens", str(max_batch_tokens)]
    serve_args += ["--policy-tokenizer", f"{POLICY_NAME}={policy_folder}"]
    measured: dict[str, list[dict[str, Any]]] = {key: [] for key in paths}
    with spawn_server(serve_args) as spawned:
        pid = spawned.process.pid
        started, done, total = time.perf_counter(), 0, 2 * runs
        for run in range(runs):
            order = list(paths) if run % 2 == 0 else list(reversed(paths))
            for key in order:
                figures = run_service(spawned.url, paths[key], check_rewards=True, server_pid=pid)
                measured[key].append(figures)
                done += 1
                eta = (time.perf_counter() - started) / done * (total - done)
                other = figures.get("other_processes_cpu_s")
                _log(
                    f"mixed-policy {key} run {run + 1}/{runs}: "
                    f"{figures['tokens_per_s']:,.0f} RM tokens/s in {figures['seconds']:.1f} s"
                    + ("" if other is None else f" (other processes' CPU {other:.1f} s)")
                    + f"; {done}/{total} done, ETA {eta:.0f} s"
                )
        peak = peak_rss_mb(pid)
    result: dict[str, Any] = {
        "items": len(twins.rm.items),
        "rm_tokens": twins.rm.tokens,
        "policy_tokens": twins.policy_tokens,
        "policy_tokenizer": policy_tokenizer_label(),
        "rm_tokenizer": rm_label,
        "model_path": str(folder),
    }
    for key in paths:
        result[key] = _median(measured[key])
        result[key]["tokens_per_s_per_run"] = [r["tokens_per_s"] for r in measured[key]]
        result[key]["host_prepare_s"] = statistics.median(prepare[key])
    result["ratio"] = result["policy_path"]["tokens_per_s"] / result["id_path"]["tokens_per_s"]
    result["ratio_per_run"] = [
        p["tokens_per_s"] / i["tokens_per_s"]
        for i, p in zip(measured["id_path"], measured["policy_path"], strict=True)
    ]
    result["server_peak_rss_mb"] = peak
    return result


def _emit(report: dict[str, Any], out: str | None) -> None:
    text = json.dumps(report, indent=2, sort_keys=False)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def known_workloads(value: str) -> list[str]:
    """``all`` or a comma list of names; ``all`` leaves out the opt-in workloads."""
    if value == "all":
        return list(WORKLOADS)
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in (*WORKLOADS, *OPT_IN_WORKLOADS)]
    if unknown:
        raise ValueError(
            f"unknown workload(s) {unknown}; known: {', '.join(WORKLOADS)}, all (those three), "
            f"or opt-in {', '.join(OPT_IN_WORKLOADS)}"
        )
    return names
