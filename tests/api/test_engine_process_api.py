"""``tokenreward serve --engine-process on`` as a real process: the batcher and the model in
a spawned engine process, the HTTP edge in the server's, over real HTTP on 127.0.0.1.

The rewards must be plain transformers' per-prefix scores redistributed, and the same as the
in-process server's; the tokenizer, metrics, refusals, liveness and the SIGTERM drain must
behave as they do in one process.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import LiveServer, expected_rewards, reference_prefix_scores
from tokenreward_service.bench.runner import SpawnedServer, spawn_server
from tokenreward_service.config import Settings
from tokenreward_service.loading import load_reward_model

ITEMS = [
    {"id": "a", "prompt_ids": [5, 9, 30, 2], "response_ids": [40, 41, 7, 300, 12]},
    {"id": "b", "prompt_ids": [1, 2], "response_ids": [3]},
    {"id": "c", "prompt_ids": list(range(10, 60)), "response_ids": list(range(100, 180))},
    {"id": "text", "prompt": "how was the film?", "response": "warm, funny and kind"},
]
ARGS = ["--device", "cpu", "--dtype", "float32", "--max-queued-tokens", "4096"]


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


def engine_pid(server: SpawnedServer) -> int:
    """The spawned engine: the server's child that runs multiprocessing's spawn entry point."""
    for child in children(server.process.pid):
        if "spawn_main" in Path(f"/proc/{child}/cmdline").read_text():
            return child
    raise AssertionError("no engine process")


@pytest.fixture(scope="module")
def engine_server(text_model_dir: Path) -> Iterator[SpawnedServer]:
    args = ["--model", str(text_model_dir), "--engine-process", "on", *ARGS]
    with spawn_server(args) as server:
        yield server


@pytest.fixture(scope="module")
def in_process(text_model_dir: Path) -> Iterator[LiveServer]:
    model = load_reward_model(text_model_dir, device="cpu", dtype="float32")
    with LiveServer(Settings(max_queued_tokens=4096), model=model) as live:
        yield live


def test_rewards_are_per_prefix_transformers_and_equal_the_in_process_server(
    engine_server: SpawnedServer, in_process: LiveServer, text_model_dir: Path
) -> None:
    body = {"items": ITEMS, "return_prefix_scores": True}
    got = httpx.post(f"{engine_server.url}/v1/rewards", json=body, timeout=60)
    assert got.status_code == 200, got.text
    here = httpx.post(f"{in_process.url}/v1/rewards", json=body, timeout=60).json()
    for result, local in zip(got.json()["results"], here["results"], strict=True):
        assert result["id"] == local["id"]
        assert result["token_rewards"] == pytest.approx(local["token_rewards"], abs=1e-5)
        assert result["response_tokens"] == local["response_tokens"]  # the tokenizer came over
    for item, result in zip(ITEMS[:3], got.json()["results"][:3], strict=True):
        sequence = item["prompt_ids"] + item["response_ids"]
        prefix = reference_prefix_scores(text_model_dir, sequence)
        prompt_len, response_len = len(item["prompt_ids"]), len(item["response_ids"])
        rewards, score, _ = expected_rewards(
            prefix, prompt_len, response_len, beta_c=1.0, baseline="prompt"
        )
        assert result["token_rewards"] == pytest.approx(rewards, abs=1e-4)
        assert result["score"] == pytest.approx(score, abs=1e-4)


def test_the_model_description_and_metrics_come_from_the_engine(
    engine_server: SpawnedServer, in_process: LiveServer
) -> None:
    info = httpx.get(f"{engine_server.url}/v1/model").json()
    assert info == httpx.get(f"{in_process.url}/v1/model").json()
    before = httpx.get(f"{engine_server.url}/metrics").text
    assert httpx.post(f"{engine_server.url}/v1/rewards", json={"items": ITEMS}).status_code == 200
    after = httpx.get(f"{engine_server.url}/metrics").text

    def value(text: str, name: str) -> float:
        lines = [line for line in text.splitlines() if line.startswith(name + " ")]
        return float(lines[0].split()[-1]) if lines else 0.0

    batches = "tokenreward_batch_size_count"
    assert value(after, batches) > value(before, batches)
    assert value(after, "tokenreward_items_total") - value(before, "tokenreward_items_total") == 4
    assert value(after, "tokenreward_queue_tokens") == 0
    assert value(after, "tokenreward_scheduler_up") == 1


def test_refusals_and_bad_items_keep_the_wire_shape(engine_server: SpawnedServer) -> None:
    too_many = {"items": [{"prompt_ids": [1] * 3000, "response_ids": [2] * 1200}]}
    refused = httpx.post(f"{engine_server.url}/v1/rewards", json=too_many)
    assert refused.status_code == 413
    assert refused.json()["error"]["type"] == "too_large"
    bad = {"items": [ITEMS[0], {"prompt_ids": [1], "response_ids": [10_000]}]}
    answer = httpx.post(f"{engine_server.url}/v1/rewards", json=bad)
    assert answer.status_code == 422
    assert answer.json()["error"]["item"] == 1


def test_sigterm_drains_and_ends_the_engine_too(text_model_dir: Path) -> None:
    args = ["--model", str(text_model_dir), "--engine-process", "on", *ARGS]
    with spawn_server(args) as server:
        engine = engine_pid(server)
        assert httpx.post(f"{server.url}/v1/rewards", json={"items": ITEMS}).status_code == 200
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
    deadline = time.monotonic() + 30
    while Path(f"/proc/{engine}").exists() and "zombie" not in _state(engine):
        assert time.monotonic() < deadline, "the engine outlived its server"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"  # gone between the two reads


def test_a_dead_engine_fails_liveness_and_answers_503(text_model_dir: Path) -> None:
    args = ["--model", str(text_model_dir), "--engine-process", "on", *ARGS]
    with spawn_server(args) as server:
        os.kill(engine_pid(server), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/healthz").status_code != 500:
            assert time.monotonic() < deadline, "liveness did not fail"
            time.sleep(0.05)
        answer = httpx.post(f"{server.url}/v1/rewards", json={"items": ITEMS})
        assert answer.status_code == 503
        assert answer.json()["error"]["type"] == "not_ready"
        assert httpx.get(f"{server.url}/readyz").status_code == 503
