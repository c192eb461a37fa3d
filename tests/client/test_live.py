"""The client against real servers on 127.0.0.1: big submissions, a replica killed mid-call, an
overloaded server waited out, and the light install in a fresh virtual environment."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest

from tests.support import LiveServer
from tokenreward import AsyncRewardClient, RetryPolicy, RewardClient
from tokenreward_service.bench.runner import spawn_server
from tokenreward_service.config import Settings
from tokenreward_service.model import BatchScores, RewardModel

ROOT = Path(__file__).resolve().parents[2]


class CountingTransport(httpx.HTTPTransport):
    """A real HTTP transport that counts requests in flight and answers per endpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.answered: dict[int, int] = {}

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            response = super().handle_request(request)
            response.read()
        finally:
            with self.lock:
                self.in_flight -= 1
        with self.lock:
            port = request.url.port or 0
            self.answered[port] = self.answered.get(port, 0) + 1
        return response


def _items(n: int, seed: int, longest: int = 24) -> list[dict[str, object]]:
    rng = random.Random(seed)
    return [
        {
            "id": str(i),
            "prompt_ids": [rng.randrange(3, 128) for _ in range(rng.randint(1, longest))],
            "response_ids": [rng.randrange(3, 128) for _ in range(rng.randint(1, longest))],
        }
        for i in range(n)
    ]


def test_results_equal_the_servers_and_a_big_call_is_split_concurrent_in_order(
    llama: RewardModel,
) -> None:
    items = _items(5000, seed=1)
    with LiveServer(Settings(max_items_per_request=5000), model=llama) as server:
        transport = CountingTransport()
        with RewardClient(
            server.url, transport=transport, max_items_per_request=250, max_concurrency=4
        ) as client:
            results = client.rewards(items)
        direct = httpx.post(f"{server.url}/v1/rewards", json={"items": items}, timeout=300).json()[
            "results"
        ]
    assert sum(transport.answered.values()) == 20
    assert transport.max_in_flight > 1  # chunks really were in flight together
    assert [r.id for r in results] == [str(i) for i in range(5000)]
    for mine, theirs in zip(results, direct, strict=True):
        assert len(mine.token_rewards) == len(theirs["token_rewards"])
        assert mine.score == pytest.approx(theirs["score"], abs=1e-5)
        assert mine.token_rewards == pytest.approx(theirs["token_rewards"], abs=1e-5)


def test_async_twin_against_a_real_server(llama: RewardModel) -> None:
    items = _items(300, seed=2)
    with LiveServer(Settings(), model=llama) as server:

        async def main() -> None:
            async with AsyncRewardClient(server.url, max_items_per_request=64) as client:
                results = await client.rewards(items, beta_c=0.5)
                assert await client.healthy()
                assert await client.ready()
                info = await client.model_info()
                assert info.vocab_size == 128
            with RewardClient(server.url) as sync:
                again = sync.rewards(items, beta_c=0.5)
                assert sync.healthy()
                assert sync.ready()
                assert sync.model_info() == info
            assert [r.id for r in results] == [r.id for r in again]
            for a, b in zip(results, again, strict=True):
                assert a.token_rewards == pytest.approx(b.token_rewards, abs=1e-5)

        asyncio.run(main())


def test_a_replica_killed_mid_call_loses_no_reward(model_dir: object, llama_dir: Path) -> None:
    items = _items(3000, seed=3, longest=64)
    with (
        spawn_server(["--model", str(llama_dir)]) as server_a,
        spawn_server(["--model", str(llama_dir)]) as server_b,
    ):
        url_a, url_b, proc_a = server_a.url, server_b.url, server_a.process
        with RewardClient(url_b) as alone:
            expected = alone.rewards(items)
        transport = CountingTransport()
        port_a = int(url_a.rsplit(":", 1)[1])

        def kill_a_after_some_answers() -> None:
            deadline = time.monotonic() + 60
            while transport.answered.get(port_a, 0) < 3 and time.monotonic() < deadline:
                time.sleep(0.001)
            os.kill(proc_a.pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_a_after_some_answers)
        with RewardClient(
            [url_a, url_b],
            transport=transport,
            max_items_per_request=40,
            max_concurrency=6,
            retry=RetryPolicy(initial_backoff_s=0.05),
        ) as client:
            killer.start()
            results = client.rewards(items)
        killer.join()
        assert proc_a.wait(timeout=10) == -signal.SIGKILL  # it really died mid-call
    assert 3 <= transport.answered.get(port_a, 0) < 3000 // 40
    assert [r.id for r in results] == [str(i) for i in range(3000)]  # each exactly once, in order
    for got, want in zip(results, expected, strict=True):
        assert got.score == pytest.approx(want.score, abs=1e-5)
        assert got.token_rewards == pytest.approx(want.token_rewards, abs=1e-5)


class HeldModel:
    """The real model, held at the start of each forward until released (to fill the queue)."""

    def __init__(self, model: RewardModel) -> None:
        self.model = model
        self.spec = model.spec
        self.gate = threading.Event()

    def score_batch(
        self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]
    ) -> BatchScores:
        assert self.gate.wait(30)
        return self.model.score_batch(sequences, prompt_lens)


def test_an_overloaded_server_is_waited_out(llama: RewardModel) -> None:
    held = HeldModel(llama)
    settings = Settings(max_queued_tokens=100, max_batch_size=1, max_wait_ms=0)
    item = ([1] * 20, [2] * 20)
    with LiveServer(settings, model=held) as server:  # type: ignore[arg-type]
        blocker = threading.Thread(
            target=lambda: httpx.post(
                f"{server.url}/v1/rewards",
                json={"items": [{"prompt_ids": item[0], "response_ids": item[1]}] * 2},
                timeout=60,
            )
        )
        blocker.start()
        state = server.app.state.tokenreward
        deadline = time.monotonic() + 15
        while state.queue_free() != 60:  # one item in the held forward pass, one queued
            assert time.monotonic() < deadline
            time.sleep(0.005)
        statuses: list[float] = []

        def sleep(seconds: float) -> None:
            statuses.append(seconds)
            held.gate.set()  # the server recovers while the client waits
            time.sleep(min(seconds, 0.2))

        with RewardClient(server.url, sleep=sleep) as client:
            results = client.rewards([item, item])
        blocker.join()
    assert len(results) == 2
    assert len(statuses) >= 1
    assert statuses[0] >= 1.0  # the server's Retry-After was honoured


@pytest.mark.slow
def test_light_install_pulls_no_torch_and_talks_to_a_server(
    tmp_path: Path, llama: RewardModel
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(ROOT)],
        check=True,
        timeout=600,
    )
    installed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.lower()
    for heavy in ("torch", "transformers", "fastapi", "uvicorn", "numpy"):
        assert f"\n{heavy}==" not in f"\n{installed}", heavy
    with LiveServer(Settings(), model=llama) as server:
        script = (
            "import sys, tokenreward\n"
            "from tokenreward import RewardClient\n"
            f"with RewardClient({server.url!r}) as c:\n"
            "    r = c.rewards([([1, 2, 3], [4, 5])])\n"
            "assert len(r[0].token_rewards) == 2, r\n"
            "import tokenreward.integrations.vllm, tokenreward.integrations.learner\n"
            "import tokenreward.integrations.trainers\n"
            "heavy = {'torch', 'transformers', 'fastapi', 'numpy'} & set(sys.modules)\n"
            "assert not heavy, heavy\n"
            "print('ok', r[0].score)\n"
        )
        out = subprocess.run(
            [str(python), "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok ")
    # The command line works without the server's dependencies (explain is a client command).
    cli = subprocess.run(
        [str(venv / "bin" / "tokenreward"), "explain", "--help"], capture_output=True, text=True
    )
    assert cli.returncode == 0, cli.stderr
    serve = subprocess.run(
        [str(venv / "bin" / "tokenreward"), "serve"], capture_output=True, text=True
    )
    assert serve.returncode == 2
    assert "tokenreward[server]" in serve.stdout
