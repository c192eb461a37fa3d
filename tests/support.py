"""Test support: tiny models on disk, a real uvicorn server on 127.0.0.1, reference scores."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tokenreward_service.app import create_app
from tokenreward_service.config import Settings
from tokenreward_service.model import RewardModel
from tokenreward_service.server import build_server


class LiveServer:
    """A real uvicorn serving a real app on 127.0.0.1 (a free port), in a background thread."""

    def __init__(self, settings: Settings, model: RewardModel | None = None) -> None:
        self.app = create_app(settings, model=model)
        quiet = settings.model_copy(update={"host": "127.0.0.1", "log_level": "warning"})
        self.server = build_server(quiet, self.app, port=0)  # the CLI's server, on a free port
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
