"""Sliding-window attention and long items.

A Mistral- or Qwen2-style model whose window is shorter than the sequence: one pass must still
equal scoring each prefix separately, where a prefix longer than the window sees only the
window. An 8k-token item is served, and the memory a batch takes grows with its tokens (which
the batcher's token budget bounds), never with their square. (The same probe at 16k: 44 MB for
the Llama batch of 2 x 16k rows against 22 MB at 8k; 20 MB against 18 MB for the Mistral.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.support import LiveServer
from tokenreward_service.config import Settings
from tokenreward_service.loading import load_reward_model
from tokenreward_service.model import RewardModel
from tokenreward_service.tiny import save_tiny_reward_model

WINDOW = 8
TOLERANCE = 1e-4
REPO = Path(__file__).resolve().parents[2]


def _hf(folder: Path, *, window: bool = True) -> Any:
    """The model as plain transformers loads it. ``window=False``: the same weights with full
    attention."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(folder)
    if not window:
        config.sliding_window = None
        config.use_sliding_window = False
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = ["full_attention"] * config.num_hidden_layers
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, config=config, dtype=torch.float32
    )
    return model.eval()


def _per_prefix(
    model: Any, sequence: Sequence[int], ends: Sequence[int] | None = None
) -> list[float]:
    """Score of ``sequence[:k]`` run alone, for each k in ``ends`` (default: every prefix)."""
    out = []
    with torch.inference_mode():
        for k in ends or range(1, len(sequence) + 1):
            out.append(float(model(input_ids=torch.tensor([list(sequence[:k])])).logits[0, 0]))
    return out


def _windowed(architecture: str, folder: Path, layers: int) -> Path:
    save_tiny_reward_model(folder, architecture, num_layers=layers, sliding_window=WINDOW, seed=1)
    config = json.loads((folder / "config.json").read_text())
    assert config["sliding_window"] == WINDOW
    return folder


@pytest.mark.parametrize("architecture", ["mistral", "qwen2"])
def test_one_pass_through_a_sliding_window_equals_each_prefix_alone(
    tmp_path: Path, architecture: str
) -> None:
    folder = _windowed(architecture, tmp_path, layers=2)
    model = load_reward_model(folder, device="cpu", dtype="float32")
    reference = _hf(folder)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 128, (12,), generator=g).tolist()  # longer than the window
    items = [(prompt, torch.randint(3, 128, (n,), generator=g).tolist()) for n in (14, 5, 20)]
    items.append((torch.randint(3, 128, (3,), generator=g).tolist(), [5] * 18))
    body = {
        "items": [{"prompt_ids": p, "response_ids": r} for p, r in items],
        "return_prefix_scores": True,
    }
    with LiveServer(Settings(max_wait_ms=50), model=model) as server:
        response = httpx.post(f"{server.url}/v1/rewards", json=body, timeout=60)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    for (p, r), result in zip(items, results, strict=True):
        expected = _per_prefix(reference, [*p, *r])
        assert result["prefix_scores"] == pytest.approx(expected[len(p) :], abs=TOLERANCE)
        assert result["prompt_score"] == pytest.approx(expected[len(p) - 1], abs=TOLERANCE)
    # The three items that share the 12-token prompt compute it once, with its key/value
    # cache (which keeps only the window for sliding layers), and still agree.
    shared = model.score_shared([[*p, *r] for p, r in items], [len(p) for p, _ in items])
    assert shared.shared_items == 3
    for row, result in zip(shared.scores, results, strict=True):
        assert row.tolist()[-len(result["prefix_scores"]) :] == pytest.approx(
            result["prefix_scores"], abs=TOLERANCE
        )
    # The window is in force: the same weights with full attention agree within the window
    # and not beyond it.
    full = _hf(folder, window=False)
    sequence = [*items[0][0], *items[0][1]]
    windowed, unwindowed = _per_prefix(reference, sequence), _per_prefix(full, sequence)
    assert windowed[:WINDOW] == pytest.approx(unwindowed[:WINDOW], abs=TOLERANCE)
    assert (
        max(abs(a - b) for a, b in zip(windowed[WINDOW:], unwindowed[WINDOW:], strict=True)) > 0.05
    )


@pytest.mark.parametrize("architecture", ["mistral", "qwen2"])
def test_through_one_windowed_layer_a_prefix_sees_exactly_its_last_window(
    tmp_path: Path, architecture: str
) -> None:
    """A reference that knows nothing of sliding masks: with one layer and rotary positions
    (attention depends on relative positions only), a prefix's score through the window is
    the full-attention model's score of the prefix's last WINDOW tokens alone."""
    folder = _windowed(architecture, tmp_path, layers=1)
    model = load_reward_model(folder, device="cpu", dtype="float32")
    full = _hf(folder, window=False)
    sequence = torch.randint(3, 128, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    served = model.score([sequence])[0].tolist()
    truncated = [
        _per_prefix(full, sequence[max(0, k - WINDOW) : k], [k - max(0, k - WINDOW)])[0]
        for k in range(1, len(sequence) + 1)
    ]
    assert served == pytest.approx(truncated, abs=TOLERANCE)


def test_long_sequences_run_through_the_window_in_chunks(tmp_path: Path) -> None:
    """Past window + chunk tokens the decoder runs chunk by chunk against its cache; the
    scores are those of one pass (and of each prefix alone)."""
    folder = _windowed("mistral", tmp_path, layers=2)
    model = load_reward_model(folder, device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (41, 30, 7)]
    whole = model.score(rows)
    calls = _count_calls(model)
    model.sliding_chunk = 5  # 41 > 8 + 5: chunks of 5 tokens
    chunked = model.score(rows)
    assert len(calls) == 9  # ceil(41 / 5) forward calls for the padded batch
    for a, b in zip(whole, chunked, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    expected = _per_prefix(_hf(folder), rows[0])
    assert chunked[0].tolist() == pytest.approx(expected, abs=TOLERANCE)


def _count_calls(model: RewardModel) -> list[int]:
    calls: list[int] = []
    backbone = model._backbone
    forward = backbone.forward

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(int(kwargs["input_ids"].shape[1]))
        return forward(*args, **kwargs)

    backbone.forward = counted
    return calls


def test_an_8k_token_item_is_served(tmp_path: Path) -> None:
    """One 8,192-token item, longer than the batch token budget (it runs alone, as the batcher
    runs any item longer than its budget), next to a short one; spot-checked against the
    prefixes scored alone, up to the full 8k. (Through a sliding window, long rows run in
    chunks: checked above against each prefix, and at 8k by the memory probe below.)"""
    save_tiny_reward_model(tmp_path, "llama", max_positions=16384, seed=6)
    model = load_reward_model(tmp_path, device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(3, 128, (100,), generator=g).tolist()
    response = torch.randint(3, 128, (8092,), generator=g).tolist()
    body = {
        "items": [
            {"prompt_ids": prompt, "response_ids": response},
            {"prompt_ids": [5, 6], "response_ids": [7, 8, 9]},
        ],
        "return_prefix_scores": True,
    }
    settings = Settings(max_batch_tokens=4096, max_length=16384)
    with LiveServer(settings, model=model) as server:
        answer = httpx.post(f"{server.url}/v1/rewards", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    long, short = answer.json()["results"]
    assert len(long["token_rewards"]) == 8092
    assert len(short["token_rewards"]) == 3
    sequence = [*prompt, *response]
    ends = [101, 400, 4097, 8192]
    expected = _per_prefix(_hf(tmp_path), sequence, ends)
    served = [long["prefix_scores"][k - 101] for k in ends]
    assert served == pytest.approx(expected, abs=TOLERANCE)
    assert sum(long["token_rewards"]) == pytest.approx(
        long["score"] - long["prompt_score"], abs=1e-3
    )


def test_peak_memory_grows_with_the_tokens_not_their_square(tmp_path: Path) -> None:
    """Batches of two right-padded rows of N and N - 10 tokens, measured in a fresh process
    (``tests/model/memory_probe.py`` reads the kernel's peak resident memory). Full attention
    (Llama) keeps its fused causal kernel because the padding mask is not passed; a sliding
    window (Mistral) runs long rows in chunks. Doubling N at most about doubles the memory (a
    quadratic cost would quadruple it), and it stays below what a single N x N boolean mask
    takes. (Before, with the mask passed: 170 MiB at N = 4096 and 658 MiB at 8192 for this
    Llama, and 658 MiB for the Mistral at 8192 without chunks.)"""
    full = save_tiny_reward_model(tmp_path / "llama", "llama", max_positions=16384)
    window = save_tiny_reward_model(
        tmp_path / "mistral", "mistral", max_positions=16384, sliding_window=256
    )
    runs = {str(full): (4096, 8192), str(window): (4096, 8192)}
    probe = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.model.memory_probe",
            *(f"{folder}:{short},{long}" for folder, (short, long) in runs.items()),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    for folder, (short, long) in runs.items():
        needed = {int(n): v for n, v in report[folder].items()}
        assert 0 < needed[long] < 3 * max(needed[short], 1 << 20), (folder, needed)
        assert needed[long] < long * long, (folder, needed)  # one bool [N, N] mask
