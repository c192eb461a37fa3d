"""GPU check: an 8B-shaped and a 0.5B-shaped Llama RM in bf16, in-process and through the service.

    python -m tokenreward_service.bench.gpu            # on a CUDA machine, about 5 minutes
    python -m tokenreward_service.bench.gpu --shape 8b # one shape
    python -m tokenreward_service.bench.gpu --tiny     # the same steps on CPU with a tiny shape

For each shape it builds the RM with random weights directly on the device (nothing is
downloaded or written to disk), then reports tokens/s and model FLOP utilisation (MFU) for the
in-process forward and for a real uvicorn server on 127.0.0.1 on the ``mixed`` and ``group``
workloads (and on ``mixed`` with each request's items batched alone, ``--batching off``), the
share of time the host spends preparing batches (padding, copy to the device) against the
forward pass, and the precision of the bf16 rewards against the same weights computed in
float32. The load comes from a separate client process, so the server's process holds only
the server. The small shape is where the host path decides the throughput: its workloads are
``SCALE_05B`` times larger, so that each run lasts long enough to measure.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import threading
import time
from typing import Any, Literal

import torch

from tokenreward_service.bench.runner import ideal_batches, run_inprocess, run_service
from tokenreward_service.bench.workloads import make_workload

SHAPE_8B: dict[str, int] = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
}
SHAPE_05B: dict[str, int] = {
    "hidden_size": 1024,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "intermediate_size": 3072,
    "vocab_size": 151936,
}
"""Qwen3-0.6B's sizes (its 128-wide heads as Llama's 64-wide ones): 0.5B parameters."""
SCALE_05B = 8.0
SHAPE_TINY: dict[str, int] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 1024,
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}
"""Dense bf16 peak of each GPU (vendor data sheets, without sparsity)."""


def flops_per_token(shape: dict[str, int], context: float) -> float:
    """Forward FLOPs per token: 2 x matmul parameters, plus attention scores and values over
    an average ``context`` of earlier tokens (4 x layers x hidden x context)."""
    h, layers = shape["hidden_size"], shape["num_hidden_layers"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * shape["intermediate_size"]
    return 2.0 * (layers * per_layer + h) + 4.0 * layers * h * context


def _peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def build_model(shape: dict[str, int], device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    options: dict[str, Any] = {**shape, "num_labels": 1, "pad_token_id": 0}
    config = LlamaConfig(**options, max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device(device):
        model: Any = LlamaForSequenceClassification(config)  # type: ignore[no-untyped-call]
    return model.to(dtype).eval()


def host_side_share(model: Any, workload: Any, max_batch_tokens: int) -> dict[str, float]:
    """Time the host spends preparing each batch (padding into tensors and copying them to the
    device) against the forward pass, over the workload's ideal batches. A small share means
    preparing the next batch while the current one runs cannot gain more than that share."""
    from tokenreward_service.model import right_pad

    device = torch.device(model.spec.device)
    items = workload.items
    prepare = forward = 0.0
    for batch in ideal_batches(workload, max_batch_tokens, 256):
        sequences = [items[i][0] + items[i][1] for i in batch]
        _sync(device)
        started = time.perf_counter()
        ids, mask = right_pad(sequences)
        ids, mask = ids.to(device), mask.to(device)
        _sync(device)
        prepared = time.perf_counter()
        model.score_padded(ids, mask).cpu()
        _sync(device)
        prepare += prepared - started
        forward += time.perf_counter() - prepared
    return {"prepare_s": prepare, "forward_s": forward, "share": prepare / (prepare + forward)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _serve_in_thread(model: Any, batching: Literal["on", "off"] = "on") -> tuple[str, Any]:
    from tokenreward_service.app import create_app
    from tokenreward_service.config import Settings

    app = create_app(Settings(max_batch_tokens=65536, batching=batching), model=model)
    return _serve_app_in_thread(app)


def engine_model(name: str, device: str) -> Any:
    """The shape's random-weight RM, built in an engine process (the same seed, so the same
    weights as the one served in this process)."""
    return random_rm(name, torch.device(device))[1]


def _serve_engine_in_thread(name: str, device: torch.device) -> tuple[str, Any]:
    """The service as ``tokenreward serve`` runs a model on an accelerator: the batcher and
    the model in an engine process of their own, HTTP in this one; returns once it is ready."""
    import functools

    from tokenreward_service.app import create_app
    from tokenreward_service.config import Settings

    settings = Settings(max_batch_tokens=65536, engine_process="on")
    app = create_app(settings, engine_factory=functools.partial(engine_model, name, str(device)))
    url, server = _serve_app_in_thread(app)
    state = app.state.tokenreward
    while state.load_error is None and not state.ready:
        time.sleep(0.1)  # the engine builds its model
    if state.load_error is not None:
        raise RuntimeError(f"the engine process failed: {state.load_error}")
    return url, server


def _serve_app_in_thread(app: Any) -> tuple[str, Any]:
    """A uvicorn for ``app`` on a free port of 127.0.0.1, in a daemon thread, once listening."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}", server


def _client_run(url: str, name: str, vocab_size: int, scale: float) -> dict[str, Any]:
    """One workload's load, sent from a process of its own (the workload is rebuilt there from
    its seed, so only the figures cross the process boundary)."""
    return run_service(url, make_workload(name, vocab_size=vocab_size, scale=scale))


def _run_elsewhere(url: str, name: str, vocab_size: int, scale: float) -> dict[str, Any]:
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        result: dict[str, Any] = pool.apply(_client_run, (url, name, vocab_size, scale))
    return result


SHAPES = {"8b": SHAPE_8B, "0.5b": SHAPE_05B, "tiny": SHAPE_TINY}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny shape (runs on CPU)")
    parser.add_argument("--shape", default="8b,0.5b", help="comma-separated shapes: 8b, 0.5b, tiny")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of each workload")
    parser.add_argument("--out", help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    names = ["tiny"] if args.tiny else [n.strip() for n in args.shape.split(",")]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.error(f"unknown shape {unknown[0]!r}; known: {', '.join(SHAPES)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sys.setswitchinterval(0.001)  # as `tokenreward serve` runs: see cli._serve
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "checks": {},
    }
    started = time.perf_counter()
    for number, name in enumerate(names):
        scale = args.scale * (SCALE_05B if name == "0.5b" else 1.0)
        print(f"[{number + 1}/{len(names)}] shape {name}, scale {scale:g}", file=sys.stderr)
        report["checks"][name] = check_shape(name, device, scale)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["total_s"] = time.perf_counter() - started
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text + "\n")
    return 0


def random_rm(name: str, device: torch.device) -> tuple[Any, Any]:
    """The shape's bf16 transformers model with seeded random weights, and the RM serving it."""
    from tokenreward_service.model import ModelSpec, RewardModel

    shape = SHAPES[name]
    dtype = torch.bfloat16
    hf_model = build_model(shape, device, dtype)
    spec = ModelSpec(
        id=f"gpu-check-random-{name}",
        revision="sha256:random",
        architecture="LlamaForSequenceClassification",
        vocab_size=shape["vocab_size"],
        max_length=8192,
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        suffix_ids=(),
        random_weights=True,
    )
    return hf_model, RewardModel(hf_model, spec)


def check_shape(name: str, device: torch.device, scale: float) -> dict[str, Any]:
    from tokenreward_service.model import RewardModel

    shape = SHAPES[name]
    started = time.perf_counter()
    hf_model, model = random_rm(name, device)
    spec = model.spec
    report: dict[str, Any] = {
        "shape": shape,
        "parameters": sum(p.numel() for p in hf_model.parameters()),
        "scale": scale,
        "dtype": spec.dtype,
        "build_s": time.perf_counter() - started,
    }
    peak = _peak_tflops(device)
    url, server = _serve_in_thread(model)
    engine_url, engine_server = _serve_engine_in_thread(name, device)
    for workload_name in ("mixed", "group"):
        workload = make_workload(workload_name, vocab_size=shape["vocab_size"], scale=scale)
        items = workload.items
        context = sum((len(p) + len(r)) ** 2 / 2 for p, r in items) / max(1, workload.tokens)
        flops = flops_per_token(shape, context)
        model.score_batch([[1] * 64], [8])  # warm-up
        inproc = run_inprocess(model, workload, max_batch_tokens=65536, max_batch_size=256)
        service = _run_elsewhere(url, workload_name, shape["vocab_size"], scale)
        entry: dict[str, Any] = {"tokens": workload.tokens, "inprocess": inproc, "service": service}
        # The same load with the engine in a process of its own (what `serve` runs on a GPU).
        entry["service_engine_process"] = _run_elsewhere(
            engine_url, workload_name, shape["vocab_size"], scale
        )
        if workload_name == "mixed":
            entry["host_side"] = host_side_share(model, workload, 65536)
            # Each request's items alone (--batching off): what batching across requests gains.
            alone_url, alone_server = _serve_in_thread(model, batching="off")
            entry["batching_off"] = _run_elsewhere(
                alone_url, workload_name, shape["vocab_size"], scale
            )
            alone_server.should_exit = True
        for key in ("inprocess", "service", "service_engine_process", "batching_off"):
            if key not in entry:
                continue
            # Counted on the tokens the model really ran: a shared prompt once, no padding.
            real = entry[key]["tokens_per_s"] * entry[key].get("computed_share", 1.0)
            achieved = real * flops / 1e12
            entry[key]["tflops"] = achieved
            entry[key]["mfu"] = achieved / peak if peak else None
        report[workload_name] = entry
        print(f"{workload_name}: done", file=sys.stderr, flush=True)
    server.should_exit = True
    engine_server.should_exit = True
    # Precision: the same bf16 weights, computed in float32, on a short sequence.
    generator = torch.Generator().manual_seed(1)
    sequence = torch.randint(0, shape["vocab_size"], (160,), generator=generator).tolist()
    low = model.score([sequence])[0].double()
    hf_model.to(torch.float32)
    exact = RewardModel(hf_model, spec).score([sequence])[0].double()
    diff_low, diff_exact = torch.diff(low[31:]), torch.diff(exact[31:])  # prompt of 32 tokens
    report["precision"] = {
        "sequence_tokens": len(sequence),
        "max_abs_score_error": float((low - exact).abs().max()),
        "max_abs_token_reward_error": float((diff_low - diff_exact).abs().max()),
        "mean_abs_token_reward": float(diff_exact.abs().mean()),
        "score_scale": float(exact.abs().mean()),
    }
    # The pipelined launch (RewardModel.launch_batch) gives what the synchronous path gives.
    batch = [sequence[:n] for n in (160, 97, 33)]
    launched = model.launch_batch(batch, [32, 32, 32])().scores
    direct = model.score_batch(batch, [32, 32, 32]).scores
    report["launch_batch_max_abs_difference"] = max(
        float((a.double() - b.double()).abs().max()) for a, b in zip(launched, direct, strict=True)
    )
    report["total_s"] = time.perf_counter() - started
    return report


if __name__ == "__main__":
    sys.exit(main())
