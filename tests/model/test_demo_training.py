"""The demo RM's training and evaluation code: a short run of the real trainer on the real
corpus writes a checkpoint the service loads and serves, and the evaluation reads per-token
credit exactly as the service hands it out."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.model.test_demo_model import served_credit
from tokenreward_service.demo import MODEL_DIR
from tokenreward_service.demo.evaluate import credit, pairwise_accuracy, token_rewards
from tokenreward_service.demo.train import MODEL_ID, Recipe, train
from tokenreward_service.loading import load_reward_model

TINY = Recipe(
    vocab_size=512,
    hidden_size=32,
    intermediate_size=64,
    layers=1,
    heads=2,
    max_positions=128,
    lm_epochs=0.02,
    rm_epochs=0.1,
    prefixes_per_text=2,
    heldout_sample=50,
)
"""The default recipe's code path at a size that trains in seconds."""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("demo") / "rm"
    return out, train(TINY, out, log=lambda message: None)


def test_token_rewards_telescope_and_fold_the_eos_step() -> None:
    # scores of [BOS, t1, t2, EOS]: rewards s1 - s0 and (s2 - s1) + (s3 - s2).
    assert token_rewards([0.0, 1.0, 3.0, 2.5]) == [1.0, 1.5]
    assert sum(token_rewards([0.2, -1.0, 0.7, 0.1, 4.0])) == pytest.approx(4.0 - 0.2)


def test_pairwise_accuracy_counts_ties_as_half() -> None:
    assert pairwise_accuracy([2.0, 3.0], [1.0]) == 1.0
    assert pairwise_accuracy([1.0], [1.0, 0.0]) == 0.75
    assert pairwise_accuracy([0.0], [1.0]) == 0.0


def test_evaluation_credit_is_what_the_service_serves() -> None:
    model = load_reward_model(MODEL_DIR, device="cpu", dtype="float32")
    text = "I love this phone, but the battery life is terrible"
    from transformers import LlamaForSequenceClassification

    hf = LlamaForSequenceClassification.from_pretrained(MODEL_DIR, dtype=torch.float32)
    hf.eval()
    assert model.tokenizer is not None
    ours = credit(hf, model.tokenizer, text)
    served = served_credit(model, text)
    assert [token for token, _, _ in ours] == [token for token, _ in served]
    for (_, reward, _), (_, want) in zip(ours, served, strict=True):
        assert reward == pytest.approx(want, abs=1e-4)


def test_a_short_training_run_writes_a_checkpoint_the_service_loads(
    tiny_run: tuple[Path, dict[str, Any]],
) -> None:
    out, report = tiny_run
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert report["recipe"]["hidden_size"] == 32
    assert report["data"]["train"] + report["data"]["heldout"] == report["data"]["corpus"]
    heldout = report["heldout"]
    for name in ("pos_vs_neg", "pos_vs_neu", "neu_vs_neg", "sample_pos_vs_neg"):
        assert 0.0 <= heldout[name] <= 1.0
    sample = json.loads((out / "heldout_sample.json").read_text())
    assert len(sample["positive"]) == len(sample["negative"]) == 50

    model = load_reward_model(out, device="cpu")
    assert model.spec.id == MODEL_ID
    assert model.spec.architecture == "LlamaForSequenceClassification"
    assert model.tokenizer is not None
    assert model.spec.suffix_ids == (model.tokenizer.eos_token_id,)
    assert model.spec.max_length == 128
    assert report["model"]["vocab_size"] == len(model.tokenizer) <= 512
    ids = model.tokenizer("what a great day")["input_ids"]
    assert model.tokenizer.decode(ids, skip_special_tokens=True) == "what a great day"
    scores = model.score([[*ids, *model.spec.suffix_ids]])[0]
    assert bool(torch.isfinite(scores).all())


def test_even_a_short_run_learns_to_rank_positive_over_negative(
    tiny_run: tuple[Path, dict[str, Any]],
) -> None:
    # A tenth of an epoch of a 1-layer model: far from the shipped model's 0.88, but well clear of
    # chance (0.5) on 3,000+ held-out tweets, so the loss really trains the score head.
    _, report = tiny_run
    assert report["heldout"]["pos_vs_neg"] > 0.6


def test_a_short_run_with_the_word_term_reports_its_words() -> None:
    from tokenreward_service.demo.words import TRAINING_FRAMES, training_words

    recipe = dataclasses.replace(TINY, word_weight=1.0, rm_epochs=0.02)
    report = train(recipe, None, log=lambda message: None)
    words = training_words(recipe.word_min_polarity)
    assert report["data"]["words"] == {
        "distribution": "textblob",
        "version": "0.20.1",
        "file": "en-sentiment.xml",
        "license": "PDDL",
        "positive": len(words.positive),
        "negative": len(words.negative),
        "neutral": len(words.neutral),
        "frames": len(TRAINING_FRAMES),
    }
    assert report["recipe"]["word_weight"] == 1.0
    assert (
        "words" not in train(dataclasses.replace(recipe, word_weight=0.0), None, log=print)["data"]
    )
