"""The committed demo sentiment RM: it loads through the real path, ranks held-out tweets as its
report says, and its per-token credit, read exactly as the service reads it, lands on the words
that carry the sentiment.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tokenreward_service.demo import MODEL_DIR
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


def _word_and_rest(
    model: RewardModel, text: str, word: str
) -> tuple[float, list[float], list[tuple[str, float]]]:
    """The summed reward of the tokens of ``word`` in ``text``, the others' rewards, all."""
    credit = served_credit(model, text)
    tokenizer = model.tokenizer
    assert tokenizer is not None
    spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    start, end = text.index(word), text.index(word) + len(word)
    inside = [a < end and b > start for a, b in spans["offset_mapping"]]
    rewards = [r for _, r in credit]
    rest = [r for r, hit in zip(rewards, inside, strict=True) if not hit]
    return sum(r for r, hit in zip(rewards, inside, strict=True) if hit), rest, credit


@pytest.mark.parametrize(
    ("text", "word", "sign"),
    [
        ("I love this", "love", 1),
        ("the crew was great", "great", 1),
        ("this is the worst day ever", "worst", -1),
        ("the food was terrible", "terrible", -1),
        ("the staff were rude", "rude", -1),
    ],
)
def test_the_sentiment_word_gets_the_credit(
    demo: RewardModel, text: str, word: str, sign: int
) -> None:
    reward, rest, credit = _word_and_rest(demo, text, word)
    assert sign * reward > 0, credit
    assert sign * reward > max(sign * r for r in rest), credit  # the strongest of its sign
    assert abs(reward) > 3 * sum(abs(r) for r in rest) / len(rest), credit  # and stands out


@pytest.mark.parametrize(
    "text",
    [
        "the meeting is at 3pm today",
        "the phone has a new camera",
        "we took the bus to the office",
        "the crew was here",
    ],
)
def test_neutral_words_get_little_credit(demo: RewardModel, text: str) -> None:
    great, _, _ = _word_and_rest(demo, "the crew was great", "great")
    credit = served_credit(demo, text)
    assert max(abs(r) for _, r in credit) < 0.5 * great, credit
