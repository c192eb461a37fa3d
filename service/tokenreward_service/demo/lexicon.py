"""The demo RM's per-token credit on sentiment words it was not trained or tuned on:
``python -m tokenreward_service.demo.lexicon``.

The probes of :func:`~tokenreward_service.demo.evaluate.probe_credit` use a dozen and a half
words chosen here, and the recipe was kept where they measured well, so they say little about
words in general. This evaluation takes its words from a lexicon written by others: VADER's
``vader_lexicon.txt`` (Hutto & Gilbert, 2014; MIT license), shipped in the PyPI package
``vaderSentiment``. Each entry is a token and its mean valence from -4 to +4, rated by ten
people. The file is read as a data file only, located through the installed distribution's
file list (the package itself is never imported).

Each word with ``|valence| >= 2`` that is a single word of letters (no emoticon, no hyphenated
or apostrophe form) and does not occur in the demo's hand-written texts (``PROBES``, frames
included, ``EXAMPLES`` and ``NEUTRAL``) is put in each of :data:`FRAMES`, neutral sentences
written for this check (none of their words is in the lexicon), and read as the service reads a
text response to the empty prompt: ``[BOS] + text tokens + [EOS]``, the EOS step folded into the
last token. A word's credit is the summed reward of the tokens that cover its characters.
:data:`SENTENCES` are whole sentences with one clear sentiment word each, and
:data:`NEUTRAL_SENTENCES` everyday sentences with none, where the credit should stay small.

A checkpoint trained with the lexicon-word term (:mod:`.words`) has seen some adjectives in
frames of its own: every figure is also given for the words it never saw there
(``untrained``), the measure of what it learnt beyond its word list, and for those it did
(``--split-by-words`` splits any checkpoint the same way, to compare it with one trained so).

Everything is reported, nothing is judged here; the sentence figures
(:func:`sentence_summary`) have floors that the shipped checkpoint must keep, in the tests.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import distribution
from pathlib import Path
from typing import Any

import torch

from tokenreward_service.demo import MODEL_DIR
from tokenreward_service.demo.data import (
    PROBES,
    distribution_file,
    hand_written_words,
    load_corpus,
    split_by_text,
)
from tokenreward_service.demo.evaluate import pairwise_accuracy
from tokenreward_service.demo.words import training_words
from tokenreward_service.model import RewardModel
from tokenreward_service.redistribution import redistribute
from tokenreward_service.tokentext import TokenText

__all__ = [
    "FRAMES",
    "LEXICON_DISTRIBUTION",
    "LEXICON_FILE",
    "MIN_VALENCE",
    "NEUTRAL_SENTENCES",
    "QUIET",
    "SENTENCES",
    "Placement",
    "Reading",
    "credit_figures",
    "evaluate_lexicon",
    "excluded_words",
    "format_report",
    "held_out_words",
    "lexicon_path",
    "load_lexicon",
    "main",
    "neutral_rows",
    "place_words",
    "read_texts",
    "sentence_ranks",
    "sentence_summary",
    "spearman",
    "split_words",
    "trained_words",
    "training_counts",
    "word_credit",
]

LEXICON_DISTRIBUTION = "vaderSentiment"
LEXICON_FILE = "vader_lexicon.txt"
LEXICON_LICENSE = "MIT"
MIN_VALENCE = 2.0
"""Words of at least this |valence| (on VADER's -4..+4 scale) are evaluated."""

FRAMES = (
    "the room was {}",
    "it felt {} to me",
    "she said the trip was {}",
    "{} is the word for it",
    "they called it {} in the email",
    "we talked about {} at lunch",
)
"""Neutral frames, none of them a ``PROBES`` frame: the word last, first and in the middle."""

SENTENCES = (
    # (sentence, its sentiment word, the word's sign)
    ("the room was dirty and the wifi never worked", "dirty", -1),
    ("the app has been useless since the last update", "useless", -1),
    ("the bathroom in our hotel smelled disgusting", "disgusting", -1),
    ("this charger broke after one week", "broke", -1),
    ("the lecture was boring from start to finish", "boring", -1),
    ("my order arrived damaged and two days late", "damaged", -1),
    ("we spent a miserable weekend at the campsite", "miserable", -1),
    ("the soup was bland and the bread was stale", "bland", -1),
    ("our train was delayed again this morning", "delayed", -1),
    ("the printer at the office is broken", "broken", -1),
    ("the staff were friendly when we checked in", "friendly", 1),
    ("the pasta was delicious and came quickly", "delicious", 1),
    ("the view from the balcony is stunning", "stunning", 1),
    ("our guide was really helpful all week", "helpful", 1),
    ("the new version of the app is brilliant", "brilliant", 1),
    ("we had a lovely afternoon at the beach", "lovely", 1),
    ("the kids were thrilled with their presents", "thrilled", 1),
    ("the bed in the guest room is comfortable", "comfortable", 1),
    ("this little cafe is fantastic for breakfast", "fantastic", 1),
    ("the nurse was kind to my mother", "kind", 1),
    # Words that are not adjectives of the training lexicon (:mod:`.words`): never trained on.
    ("the flight was cancelled an hour before boarding", "cancelled", -1),
    ("the landlord ignored every email we sent", "ignored", -1),
    ("the hotel overcharged us for parking", "overcharged", -1),
    ("the battery died halfway through the movie", "died", -1),
    ("the waiter spilled coffee all over my jacket", "spilled", -1),
    ("my bike was stolen from outside the station", "stolen", -1),
    ("my laptop crashed twice during the exam", "crashed", -1),
    ("the elevator got stuck between two floors", "stuck", -1),
    ("the airline refused to refund our tickets", "refused", -1),
    ("the concert was postponed until next spring", "postponed", -1),
    ("the team won the final last night", "won", 1),
    ("my sister passed her driving test", "passed", 1),
    ("the nurse helped my father walk again", "helped", 1),
    ("the mechanic repaired our car in one afternoon", "repaired", 1),
    ("the teacher praised my essay in class", "praised", 1),
    ("our neighbours welcomed us with a cake", "welcomed", 1),
    ("my aunt sent a gift for the baby", "gift", 1),
    ("the crowd cheered when the band came on", "cheered", 1),
    ("the firefighters rescued the cat from the roof", "rescued", 1),
    ("the garden bloomed early this spring", "bloomed", 1),
)

NEUTRAL_SENTENCES = (
    # No word of VADER's lexicon or of the training lexicon (:mod:`.words`), no content word
    # of the demo's hand-written texts.
    "the coach leaves the station at seven",
    "my brother moved to a town by the river",
    "the report goes to the board on friday afternoon",
    "we bought bread and milk on the way home",
    "the train to leeds calls at four stations",
    "she works on floor four of the building",
    "the library opens at nine on weekdays",
    "he parked the car by the house",
    "the shop sells shoes and bags",
    "our class begins after the lunch break",
    "the package was sent on tuesday",
    "they painted the kitchen in march",
    "the museum is across from the town hall",
    "i put my umbrella in the hallway",
    "the match will be shown on channel four",
    "my cousin studies chemistry in madrid",
    "the bridge was built in 1920",
    "we watched the news after dinner",
    "the copier is on the ground floor",
    "he reads the paper every morning",
    "the plane lands at gate twelve",
    "the soup this week is tomato",
    "the children walk to school together",
    "she called her sister on sunday",
    "the store closes at eight on fridays",
    "we are moving the desk into the hall",
    "the email came from the finance team",
    "the ticket costs twelve dollars",
    "the garden is beside the garage",
    "he wrote the address on the envelope",
    "the hotel is two streets from the station",
    "my appointment with the dentist is on monday",
)
"""Everyday sentences with no sentiment, written for this check: how much credit the RM puts
where there is none to give, on the scale of :data:`SENTENCES`' words."""

QUIET = 0.5
"""A neutral sentence is quiet when its largest |reward| is below this share of the median
|credit| of the sentiment words of :data:`SENTENCES`."""

_WORD = re.compile(r"[a-z]+")
_FREQUENCY_BINS = (("unseen", 0, 0), ("1-9", 1, 9), ("10+", 10, None))
"""How often a word occurs in the demo's training tweets: (name, least, most)."""

Progress = Callable[[int, int], None]


# -- the lexicon -----------------------------------------------------------------------------


def lexicon_path() -> Path:
    """Where the installed ``vaderSentiment`` distribution keeps its lexicon (not imported)."""
    return distribution_file(LEXICON_DISTRIBUTION, LEXICON_FILE, "the lexicon")


def load_lexicon(path: Path | None = None) -> dict[str, float]:
    """Every entry's mean valence, keyed by its token (words, emoticons, acronyms).

    Lines are ``token TAB mean TAB sd TAB [ten ratings]``. A few tokens have two lines; the
    later one wins, as in VADER's own reader.
    """
    lexicon: dict[str, float] = {}
    text = (path or lexicon_path()).read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.strip().split("\t")
        if len(fields) != 4:
            raise ValueError(f"line {number} of {LEXICON_FILE} has {len(fields)} fields, not 4")
        lexicon[fields[0]] = float(fields[1])
    return lexicon


def excluded_words() -> frozenset[str]:
    """Every word of the demo's hand-written texts: probe words and frames, examples, neutral
    sentences. The recipe was tuned on them, so they are left out of the evaluation."""
    return hand_written_words()


def held_out_words(
    lexicon: dict[str, float], *, min_valence: float = MIN_VALENCE
) -> tuple[list[tuple[str, float]], list[str]]:
    """(word, valence) of the single words of at least ``min_valence`` that no hand-written
    text holds, in alphabetical order, and the words left out for being in one."""
    excluded = excluded_words()
    strong = sorted(
        (word, valence)
        for word, valence in lexicon.items()
        if _WORD.fullmatch(word) and abs(valence) >= min_valence
    )
    return [e for e in strong if e[0] not in excluded], [w for w, _ in strong if w in excluded]


# -- reading texts as the service does -------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """One text scored as the service scores a text response to the empty prompt."""

    text: str
    tokens: tuple[tuple[str, float, tuple[int, int]], ...]
    """(token text, reward, character span) of each token of ``text``."""
    score: float
    """``R(x, y)``: read after the EOS suffix."""
    prompt_score: float
    """``R(x, ∅)``: the score at BOS, the baseline the rewards are taken from."""


def read_texts(
    model: RewardModel,
    texts: Sequence[str],
    *,
    batch_size: int = 512,
    progress: Progress | None = None,
) -> list[Reading]:
    """Each text as the service reads it: the prompt ``""`` with its special tokens (BOS), the
    text's tokens without, then the model's suffix (EOS); the scores of the service's model
    code, and token rewards from the service's redistribution with the prompt baseline."""
    assert model.tokenizer is not None, "the model has no tokenizer"
    rm = TokenText(model.tokenizer)
    prompt = rm.encode("", special=True)[0]
    suffix = list(model.spec.suffix_ids)
    readings: list[Reading] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        encoded = [rm.encode(text) for text in chunk]
        sequences = [[*prompt, *ids, *suffix] for ids, _ in encoded]
        scores = model.score_batch(sequences, [len(prompt)] * len(sequences)).scores
        padded = torch.zeros((len(sequences), max(map(len, sequences))), dtype=torch.float32)
        for row, row_scores in enumerate(scores):
            padded[row, : row_scores.shape[0]] = row_scores
        out = redistribute(
            padded,
            torch.tensor([len(prompt)] * len(sequences)),
            torch.tensor([len(ids) for ids, _ in encoded]),
            torch.tensor([len(seq) for seq in sequences]),
            baseline="prompt",
        )
        rewards = out.token_rewards.tolist()
        for row, (text, (ids, offsets)) in enumerate(zip(chunk, encoded, strict=True)):
            tokens = tuple(
                (text[a:b], r, (a, b))
                for (a, b), r in zip(offsets, rewards[row][: len(ids)], strict=True)
            )
            score, baseline = float(out.score[row]), float(out.prompt_score[row])
            readings.append(Reading(text, tokens, score, baseline))
        if progress is not None:
            progress(len(readings), len(texts))
    return readings


def word_credit(reading: Reading, start: int, end: int) -> tuple[float, list[float]]:
    """The summed reward of the tokens that cover characters ``[start, end)`` of the text, and
    the rewards of the other tokens."""
    inside = [a < end and b > start for _, _, (a, b) in reading.tokens]
    rewards = [r for _, r, _ in reading.tokens]
    others = [r for r, hit in zip(rewards, inside, strict=True) if not hit]
    return sum(r for r, hit in zip(rewards, inside, strict=True) if hit), others


# -- measures --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """A word put in a frame, and what the RM made of it."""

    word: str
    valence: float
    frame: str
    credit: float
    """Summed reward of the word's tokens (the last token also carries the EOS step)."""
    others: tuple[float, ...]
    """Rewards of the frame's other tokens."""
    score: float
    prompt_score: float


def place_words(
    model: RewardModel,
    words: Sequence[tuple[str, float]],
    frames: Sequence[str] = FRAMES,
    *,
    progress: Progress | None = None,
) -> list[Placement]:
    """Every word in every frame, read as the service reads it (word-major order)."""
    jobs = [(word, valence, frame) for word, valence in words for frame in frames]
    readings = read_texts(model, [f.format(w) for w, _, f in jobs], progress=progress)
    placements = []
    for (word, valence, frame), reading in zip(jobs, readings, strict=True):
        start = frame.index("{}")
        credit, others = word_credit(reading, start, start + len(word))
        placements.append(
            Placement(
                word, valence, frame, credit, tuple(others), reading.score, reading.prompt_score
            )
        )
    return placements


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    first = 0
    while first < len(order):
        last = first
        while last + 1 < len(order) and values[order[last + 1]] == values[order[first]]:
            last += 1
        for position in range(first, last + 1):
            ranks[order[position]] = (first + last) / 2 + 1
        first = last + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get mean ranks); NaN if either side is constant."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} values against {len(y)}")
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5 if vx > 0 and vy > 0 else float("nan")


def _share(flags: Iterable[bool]) -> float:
    values = list(flags)
    return sum(values) / len(values) if values else float("nan")


def credit_figures(placements: Sequence[Placement]) -> dict[str, float]:
    """What the placements say about credit and end score (each placement counts once).

    ``sign_*``: the credit has the valence's sign; ``above_median``: |credit| exceeds the median
    |reward| of the same text's other tokens; ``top``: the credit has the valence's sign and the
    largest magnitude of the text (the probes' hit criterion); ``auc``: a positive word's credit
    beats a negative word's (ties half). ``end_*``: the same for the end score, its sign taken
    against the BOS score (the baseline the rewards sum from; neutral texts are trained to stay
    there) and, ``end_raw_sign_*``, against zero.
    """
    pos = [p for p in placements if p.valence > 0]
    neg = [p for p in placements if p.valence < 0]
    others = [abs(r) for p in placements for r in p.others]
    word = sum(abs(p.credit) for p in placements) / len(placements)
    other = sum(others) / len(others)
    valences = [p.valence for p in placements]
    return {
        "words": len({p.word for p in placements}),
        "texts": len(placements),
        "word_mean_abs": word,
        "other_mean_abs": other,
        "word_over_other": word / other,
        "sign_positive": _share(p.credit > 0 for p in pos),
        "sign_negative": _share(p.credit < 0 for p in neg),
        "spearman": spearman([p.credit for p in placements], valences),
        "above_median": _share(
            abs(p.credit) > statistics.median(abs(r) for r in p.others) for p in placements
        ),
        "top": _share(
            p.credit * p.valence > 0 and abs(p.credit) > max(abs(r) for r in p.others)
            for p in placements
        ),
        "auc": pairwise_accuracy([p.credit for p in pos], [p.credit for p in neg]),
        "end_sign_positive": _share(p.score > p.prompt_score for p in pos),
        "end_sign_negative": _share(p.score < p.prompt_score for p in neg),
        "end_raw_sign_positive": _share(p.score > 0 for p in pos),
        "end_raw_sign_negative": _share(p.score < 0 for p in neg),
        "end_spearman": spearman([p.score for p in placements], valences),
        "end_auc": pairwise_accuracy([p.score for p in pos], [p.score for p in neg]),
    }


def sentence_ranks(
    model: RewardModel, sentences: Sequence[tuple[str, str, int]] = SENTENCES
) -> list[dict[str, Any]]:
    """Each sentence's word: its credit and its rank (1 = largest) among the sentence's tokens
    by |reward|, the word's tokens counting as one; and the other token of largest |reward|."""
    rows = []
    for (text, word, sign), reading in zip(
        sentences, read_texts(model, [t for t, _, _ in sentences]), strict=True
    ):
        match = re.search(rf"\b{re.escape(word)}\b", text)
        if match is None:
            raise ValueError(f"{word!r} is not a word of {text!r}")
        credit, _ = word_credit(reading, match.start(), match.end())
        others = [
            (token, r)
            for token, r, (a, b) in reading.tokens
            if b <= match.start() or a >= match.end()
        ]
        top = max(others, key=lambda other: abs(other[1]))
        rows.append(
            {
                "text": text,
                "word": word,
                "sign": sign,
                "credit": credit,
                "rank": 1 + sum(abs(r) > abs(credit) for _, r in others),
                "tokens": 1 + len(others),
                "top": top[0],
                "top_reward": top[1],
                "score_change": reading.score - reading.prompt_score,
            }
        )
    return rows


def neutral_rows(
    model: RewardModel, sentences: Sequence[str] = NEUTRAL_SENTENCES
) -> list[dict[str, Any]]:
    """Each neutral sentence's token of largest |reward|, its mean |reward| and the change of
    the score from BOS to the end (the summed rewards)."""
    rows = []
    for reading in read_texts(model, sentences):
        top = max(reading.tokens, key=lambda token: abs(token[1]))
        rewards = [abs(r) for _, r, _ in reading.tokens]
        rows.append(
            {
                "text": reading.text,
                "top": top[0],
                "top_reward": top[1],
                "mean_abs": sum(rewards) / len(rewards),
                "score_change": reading.score - reading.prompt_score,
            }
        )
    return rows


def sentence_summary(
    sentences: Sequence[dict[str, Any]], neutral: Sequence[dict[str, Any]]
) -> dict[str, float]:
    """What the sentences say, on the scale of the model's own credit: ``word_credit`` is the
    median |credit| of the sentiment words of :func:`sentence_ranks`' rows; a neutral sentence
    is ``quiet`` when its largest |reward| is below :data:`QUIET` of it."""
    scale = statistics.median(abs(row["credit"]) for row in sentences)
    return {
        "sentences": len(sentences),
        "sign_right": _share(row["credit"] * row["sign"] > 0 for row in sentences),
        "rank_1": _share(row["rank"] == 1 for row in sentences),
        "mean_rank": sum(row["rank"] for row in sentences) / len(sentences),
        "word_credit": scale,
        "neutral_sentences": len(neutral),
        "neutral_quiet": _share(abs(row["top_reward"]) < QUIET * scale for row in neutral),
        "neutral_top_over_word": statistics.median(abs(row["top_reward"]) for row in neutral)
        / scale,
        "neutral_change_over_word": statistics.median(abs(row["score_change"]) for row in neutral)
        / statistics.median(abs(row["score_change"]) for row in sentences),
    }


def training_counts(words: Iterable[str], model_dir: Path = MODEL_DIR) -> dict[str, int] | None:
    """How often each word occurs in the checkpoint's training tweets (its report's split of
    the demo corpus), or None where the corpus is not installed."""
    recipe = json.loads((model_dir / "report.json").read_text())["recipe"]
    try:
        corpus = load_corpus()
    except FileNotFoundError:
        return None
    train, _ = split_by_text(
        corpus, seed=recipe["seed"], heldout_fraction=recipe["heldout_fraction"]
    )
    counts = Counter(
        w
        for example in train
        if example.confidence >= recipe["min_confidence"]
        for w in _WORD.findall(example.text.lower())
    )
    return {word: counts[word] for word in words}


def split_words(min_polarity: float) -> frozenset[str]:
    """Every training word of :mod:`.words` at ``min_polarity``."""
    return training_words(min_polarity).all()


def trained_words(model_dir: Path = MODEL_DIR) -> frozenset[str]:
    """The lexicon-word term's words (:mod:`.words`) the checkpoint was trained on, from its
    report's recipe; empty for a checkpoint trained without the term."""
    recipe = json.loads((model_dir / "report.json").read_text())["recipe"]
    if recipe.get("word_weight", 0.0) <= 0:
        return frozenset()
    return split_words(recipe["word_min_polarity"])


# -- the whole evaluation --------------------------------------------------------------------


def evaluate_lexicon(
    model: RewardModel,
    *,
    limit: int | None = None,
    corpus: bool = True,
    progress: Progress | None = None,
    model_dir: Path = MODEL_DIR,
    trained: frozenset[str] | None = None,
) -> dict[str, Any]:
    """The whole evaluation as a JSON-able report. ``limit``: only the first ``limit`` words of
    each sign (alphabetical); ``corpus``: also split the figures by training-corpus frequency;
    ``trained``: the words to split the figures by (default: the checkpoint's training words,
    :func:`trained_words`), to compare checkpoints on the same split."""
    path = lexicon_path()
    lexicon = load_lexicon(path)
    held_out, excluded = held_out_words(lexicon)
    words = held_out
    if limit is not None:
        words = [e for e in words if e[1] > 0][:limit] + [e for e in words if e[1] < 0][:limit]
    probe_words = [
        (word, lexicon.get(word, float(sign)))
        for _, positive, negative in PROBES
        for sign, group in ((1, positive), (-1, negative))
        for word in group
    ]
    placements = place_words(model, words, progress=progress)
    reference = place_words(model, probe_words)
    if trained is None:
        trained = trained_words(model_dir)
    split = {
        name: [p for p in placements if (p.word in trained) == inside]
        for name, inside in (("untrained", False), ("trained", True))
        if trained
    }

    per_word: dict[str, list[Placement]] = {}
    for placement in placements:
        per_word.setdefault(placement.word, []).append(placement)
    counts = training_counts(per_word, model_dir) if corpus else None
    word_rows = [
        {
            "word": word,
            "valence": group[0].valence,
            "credit": sum(p.credit for p in group) / len(group),
            "end_change": sum(p.score - p.prompt_score for p in group) / len(group),
            "training_count": None if counts is None else counts[word],
            "trained": word in trained,
        }
        for word, group in per_word.items()
    ]
    by_frequency = {}
    if counts is not None:
        for name, least, most in _FREQUENCY_BINS:
            inside = [
                p
                for p in placements
                if counts[p.word] >= least and (most is None or counts[p.word] <= most)
            ]
            if {p.valence > 0 for p in inside} == {True, False}:
                by_frequency[name] = credit_figures(inside)
    sentences = [{**row, "trained": row["word"] in trained} for row in sentence_ranks(model)]
    neutral = neutral_rows(model)
    dist = distribution(LEXICON_DISTRIBUTION)
    return {
        "lexicon": {
            "distribution": LEXICON_DISTRIBUTION,
            "version": dist.version,
            "file": LEXICON_FILE,
            "license": LEXICON_LICENSE,
            "entries": len(lexicon),
            "single_words": sum(1 for w in lexicon if _WORD.fullmatch(w)),
            "min_valence": MIN_VALENCE,
            "candidates": len(held_out) + len(excluded),
            "excluded": excluded,
            "held_out": len(held_out),
            "evaluated": len(words),
            "positive": sum(1 for _, v in words if v > 0),
            "negative": sum(1 for _, v in words if v < 0),
        },
        "model": {"id": model.spec.id, "revision": model.spec.revision},
        "frames": list(FRAMES),
        "trained_words": len(trained),
        "lexicon_words": credit_figures(placements),
        "by_training": {
            name: credit_figures(group)
            for name, group in split.items()
            if {p.valence > 0 for p in group} == {True, False}
        },
        "probe_words": credit_figures(reference),
        "by_frame": {
            frame: credit_figures([p for p in placements if p.frame == frame]) for frame in FRAMES
        },
        "by_training_frequency": by_frequency,
        "sentences": sentences,
        "neutral_sentences": neutral,
        "sentence_summary": sentence_summary(sentences, neutral),
        "words": word_rows,
    }


def _figure(value: float) -> str:
    return "    n/a" if value != value else f"{value:7.3f}"


_ROWS = (
    ("texts (words x frames)", "texts"),
    ("mean |credit| of the word", "word_mean_abs"),
    ("mean |reward| of other tokens", "other_mean_abs"),
    ("word over other", "word_over_other"),
    ("sign right, positive words", "sign_positive"),
    ("sign right, negative words", "sign_negative"),
    ("Spearman credit vs valence", "spearman"),
    ("|credit| > median other |reward|", "above_median"),
    ("right sign and largest |reward|", "top"),
    ("AUC credit, pos vs neg", "auc"),
    ("end R-R(BOS) sign right, pos", "end_sign_positive"),
    ("end R-R(BOS) sign right, neg", "end_sign_negative"),
    ("end R sign right (vs 0), pos", "end_raw_sign_positive"),
    ("end R sign right (vs 0), neg", "end_raw_sign_negative"),
    ("Spearman end score vs valence", "end_spearman"),
    ("AUC end score, pos vs neg", "end_auc"),
)


def format_report(report: dict[str, Any], *, top: int = 10) -> str:
    """The report as a short text summary; ``top`` > 0 adds the most positive- and
    negative-credited words and the worst misses."""
    lex = report["lexicon"]
    lines = [
        f"demo RM {report['model']['id']} ({report['model']['revision'][:19]})",
        f"lexicon {lex['distribution']} {lex['version']} {lex['file']} ({lex['license']}): "
        f"{lex['entries']} entries, {lex['single_words']} single words",
        f"|valence| >= {lex['min_valence']:g}: {lex['candidates']} single words, "
        f"{len(lex['excluded'])} of them in the demo's hand-written texts "
        f"({', '.join(lex['excluded'])}), {lex['held_out']} left",
    ]
    lines.append(
        f"evaluated: {lex['evaluated']} words ({lex['positive']} positive, "
        f"{lex['negative']} negative) in {len(report['frames'])} frames: "
        + " | ".join(report["frames"])
    )
    table = {"lexicon": report["lexicon_words"], **report["by_training"]}
    table["probes"] = report["probe_words"]
    lines += ["", f"{'':34}" + "".join(f"{name:>11}" for name in table)]
    for label, key in _ROWS:
        cells = [fig[key] for fig in table.values()]
        if key == "texts":
            lines.append(f"{label:34}" + "".join(f"{c:11d}" for c in cells))
        else:
            lines.append(f"{label:34}" + "".join(f"{_figure(c):>11}" for c in cells))
    if report["by_training"]:
        lines.append(
            f"(untrained / trained: the lexicon words outside / inside the split's "
            f"{report['trained_words']} training words)"
        )
    lines.append("(probes: the demo's own probe words in the same frames, for reference)")

    columns = (
        ("words", "words"),
        ("sign+", "sign_positive"),
        ("sign-", "sign_negative"),
        ("Spearman", "spearman"),
        ("AUC", "auc"),
        ("wd/other", "word_over_other"),
    )
    header = "".join(f"{name:>9}" for name, _ in columns)
    for title, groups in (
        ("lexicon words by frame", report["by_frame"]),
        ("by occurrences in the training tweets", report["by_training_frequency"]),
    ):
        if groups:
            lines += ["", f"{title:34}{header}"]
        for name, fig in groups.items():
            cells = [
                f"{fig[key]:9d}" if key == "words" else f"{_figure(fig[key]):>9}"
                for _, key in columns
            ]
            lines.append(f"  {name:32}" + "".join(cells))

    rows = report["sentences"]
    lines += ["", "sentences: the word's rank among the tokens by |reward| (1 = largest)"]
    for row in rows:
        right = "ok" if row["credit"] * row["sign"] > 0 else "WRONG SIGN"
        mark = "*" if row["trained"] else " "
        lines.append(
            f" {mark}{row['rank']:2d}/{row['tokens']:<2d} {row['credit']:+.3f} {right:10} "
            f"{row['text']}  [{row['word']}; top other: {row['top']!r} {row['top_reward']:+.3f}]"
        )
    groups = {"all": rows}
    if any(row["trained"] for row in rows):
        lines.append("  (*: a training word)")
        groups["untrained"] = [row for row in rows if not row["trained"]]
        groups["trained"] = [row for row in rows if row["trained"]]
    for name, group in groups.items():
        ranks = [row["rank"] for row in group]
        lines.append(
            f"  {name} ({len(group)}): rank 1: {_share(r == 1 for r in ranks):.2f}, "
            f"mean rank {sum(ranks) / len(ranks):.2f}, "
            f"sign right: {_share(row['credit'] * row['sign'] > 0 for row in group):.2f}"
        )

    summary = report["sentence_summary"]
    lines += [
        "",
        f"neutral sentences: the token of largest |reward| (quiet: below {QUIET:g} of the "
        f"sentiment words' median |credit|, {summary['word_credit']:.3f})",
    ]
    for row in report["neutral_sentences"]:
        quiet = "quiet" if abs(row["top_reward"]) < QUIET * summary["word_credit"] else "LOUD"
        lines.append(
            f"  {row['top_reward']:+.3f} {quiet:5} {row['text']}  [{row['top']!r}; "
            f"end {row['score_change']:+.3f}]"
        )
    lines.append(
        f"  quiet: {summary['neutral_quiet']:.2f} of {summary['neutral_sentences']}; median "
        f"largest |reward| over word |credit|: {summary['neutral_top_over_word']:.2f}; median "
        f"|end change| over the sentiment sentences': {summary['neutral_change_over_word']:.2f}"
    )

    if top > 0:
        words = report["words"]

        def show(row: dict[str, Any]) -> str:
            seen = "" if row["training_count"] is None else f", seen {row['training_count']}x"
            mark = "*" if row["trained"] else ""
            return f"{row['word']}{mark} {row['credit']:+.3f} ({row['valence']:+.1f}{seen})"

        by_credit = sorted(words, key=lambda row: row["credit"])
        misses = sorted(words, key=lambda row: row["credit"] * (1 if row["valence"] > 0 else -1))
        lines += [
            "",
            "mean credit over the frames (valence, training occurrences; *: a training word):",
            "  most positive: " + ", ".join(show(row) for row in by_credit[::-1][:top]),
            "  most negative: " + ", ".join(show(row) for row in by_credit[:top]),
            "  worst misses:  " + ", ".join(show(row) for row in misses[:top]),
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate the committed demo RM (or ``--model DIR``) on the lexicon; print the summary."""
    from tokenreward_service.loading import load_reward_model

    parser = argparse.ArgumentParser(
        description="The demo RM's per-token credit on VADER lexicon words it was not tuned on."
    )
    parser.add_argument("--limit", type=int, default=None, help="only N words of each sign")
    parser.add_argument("--top", type=int, default=10, help="words listed per list (0: none)")
    parser.add_argument("--no-corpus", action="store_true", help="no training-frequency split")
    parser.add_argument("--json", type=Path, default=None, help="also write the full report")
    parser.add_argument(
        "--model", type=Path, default=MODEL_DIR, help="a demo-style RM folder (default: shipped)"
    )
    parser.add_argument(
        "--split-by-words",
        type=float,
        default=None,
        metavar="MIN_POLARITY",
        help="split by the training words of this polarity (tokenreward_service.demo.words), "
        "whether or not the model was trained on them (default: the words it was trained on)",
    )
    args = parser.parse_args(argv)

    started = time.perf_counter()
    model = load_reward_model(args.model, device="cpu", dtype="float32")
    shown = [0.0]

    def progress(done: int, total: int) -> None:
        elapsed = time.perf_counter() - started
        if done == total or elapsed - shown[0] >= 5.0:
            shown[0] = elapsed
            print(f"scored {done}/{total} texts ({elapsed:.0f} s)", file=sys.stderr, flush=True)

    report = evaluate_lexicon(
        model,
        limit=args.limit,
        corpus=not args.no_corpus,
        progress=progress,
        model_dir=args.model,
        trained=None if args.split_by_words is None else split_words(args.split_by_words),
    )
    report["seconds"] = round(time.perf_counter() - started, 1)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report, top=args.top))
    print(f"\n{report['seconds']:.1f} s in all, model load included")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
