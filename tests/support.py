"""Test support: tiny models on disk, a real uvicorn server on 127.0.0.1, reference scores."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn

from tokenreward_service.app import create_app
from tokenreward_service.config import Settings
from tokenreward_service.model import RewardModel


class LiveServer:
    """A real uvicorn serving a real app on 127.0.0.1 (a free port), in a background thread."""

    def __init__(self, settings: Settings, model: RewardModel | None = None) -> None:
        self.app = create_app(settings, model=model)
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve_process(
    args: Sequence[str], env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """``tokenreward serve`` as a real subprocess; yields its URL once /readyz answers 200, the
    process, and the file its output goes to (a file, so a chatty server never blocks on a
    full pipe)."""
    port = free_port()
    cmd = [sys.executable, "-m", "tokenreward_service.cli", "serve", "--port", str(port), *args]
    log_file = Path(tempfile.mkstemp(prefix="tokenreward-serve-", suffix=".log")[1])
    with log_file.open("wb") as sink:
        proc = subprocess.Popen(
            cmd, env={**os.environ, **(env or {})}, stdout=sink, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log_file, headers=_auth_from_env(env))
        yield url, proc, log_file
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _auth_from_env(env: dict[str, str] | None) -> dict[str, str]:
    keys = (env or {}).get("TOKENREWARD_API_KEYS")
    return {"Authorization": f"Bearer {keys.split(',')[0]}"} if keys else {}


def wait_ready(
    url: str, proc: subprocess.Popen[bytes], log_file: Path, headers: dict[str, str] | None = None
) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_file.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", headers=headers, timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError("server did not become ready")


def reference_prefix_scores(model_dir: Path, sequence: Sequence[int]) -> list[float]:
    """Plain transformers, one separate forward per prefix: score of tokens[0..k] for each k.

    Independent of the service: the model's own forward and pooling, batch size 1, no padding.
    """
    model = _reference_model(model_dir)
    out = []
    with torch.inference_mode():
        for k in range(1, len(sequence) + 1):
            logits = model(input_ids=torch.tensor([list(sequence[:k])])).logits
            out.append(float(logits[0, 0]))
    return out


_REFERENCE_CACHE: dict[Path, Any] = {}


def _reference_model(model_dir: Path) -> Any:
    from transformers import AutoModelForSequenceClassification

    if model_dir not in _REFERENCE_CACHE:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
        _REFERENCE_CACHE[model_dir] = model.eval()
    return _REFERENCE_CACHE[model_dir]


def expected_rewards(
    prefix: Sequence[float], prompt_len: int, response_len: int, *, beta_c: float, baseline: str
) -> tuple[list[float], float, float | None]:
    """The RED rewards written out with plain Python loops, from per-prefix reference scores.

    ``prefix[i]`` is the score of tokens[0..i] of prompt + response + suffix.
    """
    score = prefix[-1]
    prompt_score = prefix[prompt_len - 1] if prompt_len > 0 else None
    previous = prompt_score if baseline == "prompt" else 0.0
    assert previous is not None
    rewards = []
    for t in range(response_len):
        current = score if t == response_len - 1 else prefix[prompt_len + t]
        dense = current - previous
        sparse = score if t == response_len - 1 else 0.0
        rewards.append(beta_c * dense + (1 - beta_c) * sparse)
        previous = current
    return rewards, score, prompt_score


def run(coro: Any) -> Any:
    return asyncio.run(coro)
