"""Sentiment words the demo RM is trained on besides its tweets: a published adjective lexicon
put in neutral frames written for training.

Most ordinary sentiment words are rare in the demo's tweet corpus (two words in three of the
VADER lexicon's strong words never occur there), so the tweets alone cannot teach their credit.
This lexicon is the subjectivity lexicon for English adjectives of Pattern (De Smedt &
Daelemans, 2012), ``en-sentiment.xml``, released into the public domain (PDDL) and shipped in
the PyPI package ``textblob``; it is read as a data file only, located through the installed
distribution's file list (the package is never imported). Each entry is one sense of an
adjective with a polarity from -1 to +1; a word's polarity here is the mean over its senses.

It is a different lexicon from the one the demo RM is evaluated on (VADER's, in
:mod:`.lexicon`), written by other people with other methods, and the frames below share no
text with the evaluation's frames and sentences, so that the evaluation can tell the words
trained on from those never seen (:func:`training_words` says which are which).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tokenreward_service.demo.data import distribution_file, hand_written_words

__all__ = [
    "TRAINING_FRAMES",
    "WORDS_DISTRIBUTION",
    "WORDS_FILE",
    "WORDS_LICENSE",
    "TrainingWords",
    "load_polarities",
    "training_words",
    "words_path",
]

WORDS_DISTRIBUTION = "textblob"
WORDS_FILE = "en-sentiment.xml"
WORDS_LICENSE = "PDDL"

TRAINING_FRAMES = (
    "{}",
    "so {}",
    "it was {}",
    "that is {}",
    "this looks {}",
    "a {} one",
    "the show was {}",
    "my day was {}",
    "the results were {}",
    "the third album is {}",
    "his answer sounded {}",
    "the seats are {}",
    "my cousins are {}",
    "the weather was {} this week",
    "the second episode was {}",
    "the match on friday was {}",
    "what a {} film",
    "a {} way to spend a sunday",
    "{} news from the office",
    "{} as always",
    "the evening felt {}",
    "her idea seems {}",
    "the update is {} for now",
    "overall the place is {}",
)
"""Neutral frames for the training words, none of them an evaluation frame or probe frame."""

_WORD = re.compile(r"[a-z]+")


def words_path() -> Path:
    """Where the installed ``textblob`` distribution keeps ``en-sentiment.xml`` (not imported)."""
    return distribution_file(WORDS_DISTRIBUTION, WORDS_FILE, "the training words")


def load_polarities(path: Path | None = None) -> dict[str, tuple[float, float]]:
    """(mean polarity, largest subjectivity) over the senses of each single-word adjective."""
    senses: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for element in ET.parse(path or words_path()).getroot().iter("word"):
        form = (element.get("form") or "").lower()
        if _WORD.fullmatch(form):
            polarity = float(element.get("polarity", "nan"))
            subjectivity = float(element.get("subjectivity", "nan"))
            senses[form].append((polarity, subjectivity))
    return {
        form: (sum(p for p, _ in values) / len(values), max(s for _, s in values))
        for form, values in senses.items()
    }


@dataclass(frozen=True)
class TrainingWords:
    """The words the trainer puts in :data:`TRAINING_FRAMES`, by class, alphabetical."""

    positive: tuple[str, ...]
    negative: tuple[str, ...]
    neutral: tuple[str, ...]
    """Adjectives of polarity 0 in every sense and no subjectivity ("daily", "chinese")."""

    def all(self) -> frozenset[str]:
        return frozenset((*self.positive, *self.negative, *self.neutral))


def training_words(min_polarity: float, path: Path | None = None) -> TrainingWords:
    """Words of polarity at least ``min_polarity`` (positive) or at most ``-min_polarity``
    (negative), and the neutral ones; none of the demo's hand-written texts' words, which its
    probes and examples measure."""
    if not 0 < min_polarity <= 1:
        raise ValueError("min_polarity must be in (0, 1]")
    excluded = hand_written_words()
    entries = {w: v for w, v in load_polarities(path).items() if w not in excluded}
    return TrainingWords(
        positive=tuple(sorted(w for w, (p, _) in entries.items() if p >= min_polarity)),
        negative=tuple(sorted(w for w, (p, _) in entries.items() if p <= -min_polarity)),
        neutral=tuple(sorted(w for w, (p, s) in entries.items() if p == 0 and s == 0)),
    )
