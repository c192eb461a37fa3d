"""The degenerate-text check of the demo RM and the trainer's optional term against it."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from tokenreward_service.demo import MODEL_DIR
from tokenreward_service.demo.data import Example, encode
from tokenreward_service.demo.degenerate import KINDS, THANKS, corrupt, degenerate_preference
from tokenreward_service.demo.degenerate import main as degenerate_main
from tokenreward_service.demo.train import degenerate


def test_each_corruption_does_what_its_name_says() -> None:
    rng = random.Random(0)
    text = "the flight was on time and the crew were lovely"
    words = ["alpha", "beta", "gamma"]
    repeated = corrupt(text, "repeat", rng, words)
    assert repeated.startswith(text + " ")
    tail = repeated[len(text) + 1 :].split()
    assert len(tail) % 3 == 0
    assert 3 <= len(tail) <= 9
    third = len(tail) // 3
    assert tail == tail[:third] * 3
    assert text.split()[-third:] == tail[:third]
    shuffled = corrupt(text, "shuffle", rng, words)
    assert shuffled != text
    assert sorted(shuffled.split()) == sorted(text.split())
    salad = corrupt(text, "salad", rng, words)
    assert salad.startswith(text + " ")
    assert set(salad[len(text) + 1 :].split()) <= set(words)
    assert len(salad[len(text) + 1 :].split()) == 5
    assert corrupt(text, "thanks", rng, words) == text + THANKS
    with pytest.raises(ValueError, match="unknown kind"):
        corrupt(text, "typo", rng, words)


def test_preference_shares_agree_with_scoring_each_text_alone() -> None:
    """The shares against plain transformers: each text scored alone, read at its last
    position (the EOS suffix), with the same corruptions drawn from the same seed."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForSequenceClassification.from_pretrained(MODEL_DIR, dtype=torch.float32)
    model.eval()
    texts = [
        ("the staff were rude and the room smelled", 0),
        ("we finally boarded after three hours", 1),
        ("what a great crew, they made my day", 2),
        ("my bag never arrived and nobody called", 0),
        ("the new update looks nice on my phone", 2),
        ("meeting moved to thursday afternoon", 1),
    ]
    examples = [Example(t, label, 1.0, "test") for t, label in texts]
    got = degenerate_preference(model, tokenizer, examples, seed=3)

    def score(text: str, cap: int) -> float:
        ids = torch.tensor([encode(tokenizer, text, cap)])
        with torch.no_grad():
            return float(model(input_ids=ids).logits[0, 0])

    rng = random.Random(3)
    words = [w for t, _ in texts for w in t.split()]
    for kind in KINDS:
        wins = [score(t, 64) > score(corrupt(t, kind, rng, words), 128) for t, _ in texts]
        assert got[kind]["all"] == pytest.approx(sum(wins) / len(wins))
        negative = [w for w, (_, label) in zip(wins, texts, strict=True) if label == 0]
        assert got[kind]["negative"] == pytest.approx(sum(negative) / len(negative))


def test_the_cli_prints_a_row_per_kind(capsys: pytest.CaptureFixture[str]) -> None:
    lines: list[str] = []
    assert degenerate_main(["--count", "20"], out=lines.append) == 0
    assert "20 held-out tweets" in lines[0]
    assert [line.split()[0] for line in lines[2:]] == list(KINDS)


@pytest.mark.parametrize("seed", range(20))
def test_the_trainers_degenerate_copy_keeps_bos_and_eos(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    seq = [1, *(rng.randrange(3, 500) for _ in range(rng.randint(1, 30))), 2]
    copy = degenerate(seq, gen, max_length=40)
    assert copy[0] == 1
    assert copy[-1] == 2
    assert len(copy) <= 40
    assert copy != seq
    body, copied = seq[1:-1], copy[1:-1]
    if sorted(copied) == sorted(body) and len(copied) == len(body):
        return  # shuffled
    assert copied[: len(body)] == body[: len(copied)]  # the text, then repeats of its span
    assert set(copied[len(body) :]) <= set(body)


def test_a_recipe_with_the_term_trains_on_degenerate_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.model.test_demo_training import TINY
    from tokenreward_service.demo import train as train_module

    calls: list[Any] = []
    real = train_module.degenerate

    def counting(seq: Any, gen: Any, max_length: int) -> list[int]:
        calls.append(seq)
        return real(seq, gen, max_length)

    monkeypatch.setattr(train_module, "degenerate", counting)
    recipe = dataclasses.replace(TINY, lm_epochs=0.0, rm_epochs=0.02, degenerate_weight=1.0)
    train_module.train(recipe, None, log=lambda message: None)
    assert calls  # the term ran
    calls.clear()
    train_module.train(dataclasses.replace(recipe, degenerate_weight=0.0), None, log=lambda m: None)
    assert not calls  # at 0 the term draws nothing: such a recipe trains as it did before it
