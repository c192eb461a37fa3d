"""The committed demo sentiment RM: it loads through the real path, ranks held-out tweets as its
report says, and its per-token credit, read exactly as the service reads it, lands on the words
that carry the sentiment in sentences written for evaluation, and stays small in neutral ones.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tokenreward_service.demo import MODEL_DIR
from tokenreward_service.demo.lexicon import (
    NEUTRAL_SENTENCES,
    SENTENCES,
    neutral_rows,
    sentence_ranks,
    sentence_summary,
)
from tokenreward_service.loading import load_reward_model
from tokenreward_service.model import RewardModel
from tokenreward_service.redistribution import redistribute


@pytest.fixture(scope="module")
def demo() -> RewardModel:
    return load_reward_model(MODEL_DIR, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((MODEL_DIR / "report.json").read_text())
    return data


def served_credit(model: RewardModel, text: str) -> list[tuple[str, float]]:
    """(token text, reward) of ``text`` as a response to the empty prompt ``[BOS]``."""
    tokenizer = model.tokenizer
    assert tokenizer is not None
    prompt = tokenizer("")["input_ids"]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    response = encoded["input_ids"]
    sequence = [*prompt, *response, *model.spec.suffix_ids]
    scores = model.score([sequence])[0].unsqueeze(0)
    out = redistribute(
        scores,
        torch.tensor([len(prompt)]),
        torch.tensor([len(response)]),
        torch.tensor([len(sequence)]),
        baseline="prompt",
    )
    rewards = out.token_rewards[0].tolist()
    return [(text[a:b], r) for (a, b), r in zip(encoded["offset_mapping"], rewards, strict=True)]


def test_the_checkpoint_loads_through_the_service_loader(demo: RewardModel) -> None:
    from transformers import PreTrainedTokenizerFast

    assert demo.spec.id == "tokenreward-demo-sentiment"
    assert demo.spec.architecture == "LlamaForSequenceClassification"
    assert not demo.spec.random_weights
    assert isinstance(demo.tokenizer, PreTrainedTokenizerFast)
    assert demo.spec.suffix_ids == (demo.tokenizer.eos_token_id,)
    assert demo.spec.vocab_size == len(demo.tokenizer)


def test_the_checkpoint_is_small() -> None:
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 10 * 2**20
    assert sum(p.stat().st_size for p in Path(MODEL_DIR).iterdir()) <= 11 * 2**20


@pytest.mark.parametrize(
    "text", ["I love this so much", "  two  spaces,\ttab\nnewline ", "héllo wörld 😀 ünïcödé", "x"]
)
def test_the_tokenizer_adds_bos_only_round_trips_and_gives_offsets(
    demo: RewardModel, text: str
) -> None:
    tokenizer = demo.tokenizer
    assert tokenizer is not None
    assert tokenizer("")["input_ids"] == [tokenizer.bos_token_id]
    with_special = tokenizer(text)["input_ids"]
    plain = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert with_special == [tokenizer.bos_token_id, *plain["input_ids"]]
    assert tokenizer.eos_token_id not in with_special
    assert tokenizer.decode(with_special, skip_special_tokens=True) == text
    spans = plain["offset_mapping"]
    assert spans[0][0] == 0
    assert spans[-1][1] == len(text)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start <= end  # contiguous; a multi-byte character may share its span
    if text.isascii():
        pieces = [tokenizer.decode([i]) for i in plain["input_ids"]]
        assert pieces == [text[a:b] for a, b in spans]


def test_heldout_positive_beats_negative_as_reported(
    demo: RewardModel, report: dict[str, Any]
) -> None:
    tokenizer = demo.tokenizer
    assert tokenizer is not None
    sample = json.loads((MODEL_DIR / "heldout_sample.json").read_text())
    texts = [*sample["positive"], *sample["negative"]]
    sequences = [[*tokenizer(t)["input_ids"], *demo.spec.suffix_ids] for t in texts]
    finals = torch.stack([s[-1] for s in demo.score(sequences)]).double()
    pos, neg = finals[: len(sample["positive"])], finals[len(sample["positive"]) :]
    accuracy = float((pos[:, None] > neg[None, :]).double().mean())
    assert min(len(pos), len(neg)) >= 200
    assert accuracy >= 0.85
    assert accuracy == pytest.approx(report["heldout"]["sample_pos_vs_neg"], abs=2e-3)
    assert accuracy == pytest.approx(report["heldout"]["pos_vs_neg"], abs=0.05)
    assert report["heldout"]["pos_vs_neg"] >= 0.85


# Floors of the sentence figures: the shipped recipe's worst of seeds 0, 1 and 2, rounded
# towards failing (docs/demo-rm-recipes.json); the recipe before the word term, at its best
# seed, gets the figure in brackets, so each floor tells the two apart.
SIGN_RIGHT = 0.75  # worst seed 0.75 (0.725)
RANK_1 = 0.45  # 0.475 (0.30)
MEAN_RANK = 2.75  # 2.65 (3.6)
NEUTRAL_QUIET = 0.4  # 0.406 (0.156)
NEUTRAL_TOP = 0.7  # 0.634 (0.868)
NEUTRAL_CHANGE = 0.5  # 0.475 (0.231): a bound, not a separator


@pytest.fixture(scope="module")
def sentences(demo: RewardModel) -> dict[str, float]:
    """The sentence figures of the lexicon evaluation: 40 sentences with one sentiment word
    each and 32 neutral ones, all written for evaluation (none is a training text), and not
    among the measures of the rule that chose the recipe."""
    return sentence_summary(sentence_ranks(demo), neutral_rows(demo))


def test_sentiment_words_it_was_not_tuned_on_get_the_credit(sentences: dict[str, float]) -> None:
    # Chance: the right sign half the time, the largest of a sentence's ~8 tokens one time in 8.
    assert sentences["sentences"] == len(SENTENCES) == 40
    assert sentences["sign_right"] >= SIGN_RIGHT, sentences
    assert sentences["rank_1"] >= RANK_1, sentences
    assert sentences["mean_rank"] <= MEAN_RANK, sentences


def test_neutral_sentences_get_little_credit(sentences: dict[str, float]) -> None:
    assert sentences["neutral_sentences"] == len(NEUTRAL_SENTENCES)
    assert sentences["neutral_quiet"] >= NEUTRAL_QUIET, sentences
    assert sentences["neutral_top_over_word"] <= NEUTRAL_TOP, sentences
    assert sentences["neutral_change_over_word"] <= NEUTRAL_CHANGE, sentences
