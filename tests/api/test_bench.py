"""``tokenreward bench`` and the GPU check run end to end (tiny scale; figures are not checked,
only that every measurement is made and reported)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import LiveServer
from tokenreward_service.bench.gpu import main as gpu_main
from tokenreward_service.bench.runner import ideal_batches
from tokenreward_service.bench.workloads import make_workload
from tokenreward_service.config import Settings
from tokenreward_service.loading import load_reward_model


def test_workloads_have_the_documented_shapes() -> None:
    mixed = make_workload("mixed", vocab_size=32000)
    assert len(mixed.items) == 512
    assert mixed.concurrency == 16
    assert all(len(r) == 8 for r in mixed.requests)
    assert all(32 <= len(p) <= 256 and 16 <= len(r) <= 384 for p, r in mixed.items)
    group = make_workload("group", vocab_size=32000)
    assert len(group.requests) == 64
    assert all(len({tuple(p) for p, _ in request}) == 1 for request in group.requests)
    assert all(256 <= len(p) <= 512 and 32 <= len(r) <= 128 for p, r in group.items)
    long = make_workload("long", vocab_size=32000)
    assert len(long.items) == 64
    assert all(2000 <= len(p) + len(r) <= 4000 for p, r in long.items)
    assert make_workload("mixed", vocab_size=32000).items == mixed.items  # seeded


def test_the_ceiling_packs_every_item_once_sorted_under_the_budget() -> None:
    for name in ("mixed", "group"):
        workload = make_workload(name, vocab_size=32000, scale=0.25)
        items = workload.items
        batches = ideal_batches(workload, 4096, 16)
        flat = [i for batch in batches for i in batch]
        assert sorted(flat) == list(range(len(items)))
        for batch in batches:
            longest = max(len(items[i][0]) + len(items[i][1]) for i in batch)
            assert len(batch) <= 16
            assert longest * len(batch) <= 4096 or len(batch) == 1
        if name == "mixed":  # no shared prompts: plain length order
            lengths = [len(items[i][0]) + len(items[i][1]) for i in flat]
            assert lengths == sorted(lengths)
        else:  # a group's items are adjacent, so the engine computes its prompt once
            prompts = [tuple(items[i][0]) for i in flat]
            runs = sum(1 for a, b in itertools.pairwise(prompts) if a != b) + 1
            assert runs == len(set(prompts))


def test_full_bench_runs_end_to_end(model_dir: Callable[..., Path], tmp_path: Path) -> None:
    folder = model_dir("llama", seed=5, max_positions=4096)
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "tokenreward_service.cli", "bench", "--model", str(folder)]
    cmd += ["--scale", "0.02", "--runs", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, timeout=600, capture_output=True)
    report = json.loads(out.read_text())
    mixed, group, long = (report["workloads"][n] for n in ("mixed", "group", "long"))
    for workload in (mixed, group, long):
        assert workload["service"]["errors"] == {}
        assert workload["service"]["tokens_per_s"] > 0
        assert 0 < workload["service"]["padding_efficiency"] <= 1
        assert workload["inprocess_ceiling"]["tokens_per_s"] > 0
        assert workload["server_peak_rss_mb"] > 0
    assert 0 < mixed["service"]["model_busy_share"] <= 1.05
    assert mixed["batching_off"]["tokens_per_s"] > 0
    assert mixed["half_load"]["latency_s"]["p99"] > 0
    assert group["service"]["shared_prompt_items"] == len(
        make_workload("group", vocab_size=128, scale=0.02).items
    )
    assert group["no_sharing"]["shared_prompt_items"] == 0
    assert report["naive_per_prefix"]["speedup"] > 1


def test_bench_against_a_running_server(model_dir: Callable[..., Path], tmp_path: Path) -> None:
    from tokenreward_service.bench import main_bench

    model = load_reward_model(model_dir("llama", seed=5, max_positions=4096), device="cpu")
    with LiveServer(Settings(api_keys=["bench-key-1234"]), model=model) as server:
        report = main_bench(
            workloads=["mixed"],
            runs=1,
            scale=0.02,
            url=server.url,
            api_key="bench-key-1234",
            model=None,
            max_batch_tokens=16384,
            out=str(tmp_path / "r.json"),
        )
    assert report["workloads"]["mixed"]["service"]["errors"] == {}


def test_gpu_check_runs_on_cpu_with_a_tiny_shape(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_main(["--tiny", "--scale", "0.02"]) == 0
    report = json.loads(capsys.readouterr().out)
    for name in ("mixed", "group"):
        assert report[name]["service"]["errors"] == {}
        assert report[name]["inprocess"]["tokens_per_s"] > 0
    assert report["mixed"]["batching_off"]["errors"] == {}
    assert report["mixed"]["batching_off"]["tokens_per_s"] > 0
    host = report["mixed"]["host_side"]
    assert host["prepare_s"] > 0
    assert host["forward_s"] > 0
    assert 0 < host["share"] < 1
    assert report["precision"]["max_abs_token_reward_error"] >= 0


def test_the_ceiling_splits_a_group_only_when_it_alone_exceeds_a_batch() -> None:
    workload = make_workload("group", vocab_size=32000, scale=0.25)
    items = workload.items
    for budget, split in ((16384, False), (2048, True)):  # a group is 8 items of 288-640 tokens
        batches = ideal_batches(workload, budget, 256)
        homes: dict[tuple[int, ...], set[int]] = {}
        for number, batch in enumerate(batches):
            for i in batch:
                homes.setdefault(tuple(items[i][0]), set()).add(number)
        assert any(len(h) > 1 for h in homes.values()) is split
