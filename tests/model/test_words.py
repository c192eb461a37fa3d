"""The demo RM's training words: the published adjective lexicon is found through its
distribution and read whole, the words are kept apart from everything the demo is measured on,
and the trainer's word term really orders positive over neutral over negative at the word."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from importlib.metadata import distribution
from pathlib import Path

import pytest
import torch

from tokenreward_service.demo.data import PROBES, build_tokenizer, hand_written_words
from tokenreward_service.demo.evaluate import pad_batch, prefix_scores
from tokenreward_service.demo.lexicon import (
    FRAMES,
    NEUTRAL_SENTENCES,
    SENTENCES,
    load_lexicon,
    trained_words,
)
from tokenreward_service.demo.train import Recipe, _config, _optimise, _word_loss, word_texts
from tokenreward_service.demo.words import (
    TRAINING_FRAMES,
    TrainingWords,
    load_polarities,
    training_words,
    words_path,
)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def test_the_lexicon_is_found_through_its_distribution_and_is_public_domain() -> None:
    path = words_path()
    assert distribution("textblob").version == "0.20.1"
    assert path.name == "en-sentiment.xml"
    root = ET.parse(path).getroot()
    assert root.get("license") == "PDDL"
    senses = sum(1 for _ in root.iter("word"))
    polarities = load_polarities(path)
    assert senses > 2800
    assert 1400 < len(polarities) < senses  # one entry per single-word form, senses averaged


def test_polarities_are_the_mean_over_senses_and_single_words_only(tmp_path: Path) -> None:
    xml = tmp_path / "en-sentiment.xml"
    xml.write_text(
        '<sentiment license="PDDL">'
        '<word form="Ridiculous" polarity="-0.5" subjectivity="1.0" />'
        '<word form="ridiculous" polarity="0.3" subjectivity="0.4" />'
        '<word form="well-known" polarity="0.2" subjectivity="0.1" />'
        '<word form="20th" polarity="0.0" subjectivity="0.0" />'
        '<word form="daily" polarity="0.0" subjectivity="0.0" />'
        "</sentiment>"
    )
    assert load_polarities(xml) == {
        "ridiculous": (pytest.approx(-0.1), 1.0),
        "daily": (0.0, 0.0),
    }


def test_training_words_keep_their_classes_apart_and_leave_the_probes_out() -> None:
    polarities = load_polarities()
    words = training_words(0.3)
    assert isinstance(words, TrainingWords)
    assert len(words.positive) > 300
    assert len(words.negative) > 300
    assert len(words.neutral) > 50
    assert all(polarities[w][0] >= 0.3 for w in words.positive)
    assert all(polarities[w][0] <= -0.3 for w in words.negative)
    assert all(polarities[w] == (0.0, 0.0) for w in words.neutral)
    assert len(words.all()) == len(words.positive) + len(words.negative) + len(words.neutral)
    assert not words.all() & hand_written_words()
    assert {"great", "terrible", "rude"} <= set(polarities)  # in the lexicon, left out here
    stricter = training_words(0.5)
    assert set(stricter.positive) < set(words.positive)
    assert stricter.neutral == words.neutral
    with pytest.raises(ValueError, match="min_polarity"):
        training_words(0.0)


def test_training_frames_share_nothing_with_what_the_demo_is_measured_on() -> None:
    vader = load_lexicon()
    polarities = load_polarities()
    probe_frames = {frame for frames, _, _ in PROBES for frame in frames}
    assert len(set(TRAINING_FRAMES)) == len(TRAINING_FRAMES) >= 20
    for frame in TRAINING_FRAMES:
        assert frame.count("{}") == 1
        assert frame not in probe_frames
        assert frame not in FRAMES
        words = _words(frame)
        assert not [w for w in words if w in vader or polarities.get(w, (0.0, 0.0))[0]], frame
    # no evaluation frame or sentence holds three words in a row of a training frame
    measured = [*(text for text, _, _ in SENTENCES), *NEUTRAL_SENTENCES, *FRAMES]
    for frame in TRAINING_FRAMES:
        for part in (p.split() for p in frame.split("{}")):
            for run in zip(part, part[1:], part[2:], strict=False):
                assert not any(" ".join(run) in text for text in measured), (frame, run)
    # the evaluation frames carry no training word; some sentences do, and say so
    assert not {w for f in FRAMES for w in _words(f)} & training_words(0.3).all()


def _tokenizer() -> object:
    texts = [f.format(w) for f in TRAINING_FRAMES for w in ("nice", "awful", "daily", "x")]
    return build_tokenizer(texts * 5, vocab_size=300, max_length=64)


def test_word_texts_point_at_the_last_token_of_the_word() -> None:
    tokenizer = _tokenizer()
    words = TrainingWords(("wonderfully",), ("unpleasant", "bad"), ("daily",))
    texts = word_texts(tokenizer, words)
    assert [len(group) for group in texts.texts] == [2, 1, 1]  # negative, neutral, positive
    for label, group in zip(
        (words.negative, words.neutral, words.positive), texts.texts, strict=True
    ):
        for word, per_frame in zip(label, group, strict=True):
            assert len(per_frame) == len(TRAINING_FRAMES)
            for frame, (seq, last) in zip(TRAINING_FRAMES, per_frame, strict=True):
                text = frame.format(word)
                assert seq[0] == tokenizer.bos_token_id
                assert seq[-1] == tokenizer.eos_token_id
                assert tokenizer.decode(seq[1:-1]) == text
                before = tokenizer.decode(seq[1 : last + 1])
                assert before.endswith(word)
                assert before == text[: text.index(word) + len(word)]


def test_the_word_term_orders_positive_over_neutral_over_negative_at_the_word() -> None:
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    tokenizer = _tokenizer()
    recipe = Recipe(
        vocab_size=300, hidden_size=32, intermediate_size=64, layers=1, heads=2,
        max_positions=64, word_frames=4, words_per_class=2,
    )  # fmt: skip
    model = LlamaForSequenceClassification(_config(recipe, len(tokenizer)))
    words = TrainingWords(("nice", "lovely"), ("awful", "nasty"), ("daily", "wooden"))
    texts = word_texts(tokenizer, words)
    gen = torch.Generator().manual_seed(0)
    _optimise(
        model, [[0]] * 150, 3e-3, lambda _: _word_loss(model, texts, recipe, gen), lambda _: None
    )

    def at_word(label: int, word: int) -> torch.Tensor:
        seqs = [seq for seq, _ in texts.texts[label][word]]
        ends = torch.tensor([end for _, end in texts.texts[label][word]])
        ids, mask, _ = pad_batch(seqs)
        with torch.no_grad():
            scores = prefix_scores(model, ids, mask)
        return scores[torch.arange(len(seqs)), ends] - scores[:, 0]

    negative = torch.stack([at_word(0, w) for w in range(2)])
    neutral = torch.stack([at_word(1, w) for w in range(2)])
    positive = torch.stack([at_word(2, w) for w in range(2)])
    assert bool((positive.min(0).values > neutral.max(0).values).all())
    assert bool((neutral.max(0).values > negative.max(0).values).all())
    assert bool((neutral.abs() < positive.abs().mean()).all())  # neutral stays near BOS


def test_a_checkpoint_names_the_words_it_was_trained_on(tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text('{"recipe": {"word_weight": 0.0}}')
    assert trained_words(tmp_path) == frozenset()
    (tmp_path / "report.json").write_text(
        '{"recipe": {"word_weight": 0.5, "word_min_polarity": 0.5}}'
    )
    assert trained_words(tmp_path) == training_words(0.5).all()


def test_the_added_sentences_hold_words_the_training_lexicon_lacks() -> None:
    polarities = load_polarities()
    later = [word for _, word, _ in SENTENCES[20:]]
    assert len(later) == 20
    assert not [word for word in later if word in polarities]


@pytest.mark.parametrize("target", [0.6, 0.75, 0.9])
def test_a_bounded_pair_target_stops_the_margin_at_its_logit(target: float) -> None:
    from tokenreward_service.demo.train import _bradley_terry

    labels, groups = torch.tensor([2, 0]), torch.tensor([0, 0])
    optimum = float(torch.logit(torch.tensor(target)))

    def slope(margin: float) -> float:
        scores = torch.tensor([margin, 0.0], requires_grad=True)
        _bradley_terry(scores, labels, groups, target).backward()
        assert scores.grad is not None
        return float(scores.grad[0])

    assert slope(optimum - 0.1) < 0 < slope(optimum + 0.1)  # pushed up below, down above
    assert abs(slope(optimum)) < 1e-6
    assert slope(10.0) > 0  # an easy pair is no longer pushed apart
    plain = torch.tensor([10.0, 0.0], requires_grad=True)
    _bradley_terry(plain, labels, groups).backward()
    assert plain.grad is not None
    assert float(plain.grad[0]) < 0  # target 1: always apart
