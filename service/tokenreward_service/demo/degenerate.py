"""Does the demo RM prefer a tweet to a degenerate copy of it? ``python -m
tokenreward_service.demo.degenerate [MODEL_DIR]``.

A policy optimised against a small RM finds its weak spots: repeating what scored well, word
salad, one praised word over and over. This check takes held-out tweets (the demo split, never
trained on) and compares each one's score with copies made worse in four ways:

- ``repeat``: its last one to three words repeated three more times;
- ``shuffle``: its words in a random order;
- ``salad``: five words drawn at random from other held-out tweets appended;
- ``thanks``: " Thanks! Thanks! Thanks!" appended (what PPO on the demo RM converges to).

It reports, by label, the share of tweets that score higher than their copy (1.0: the RM never
prefers the degenerate text). ``repeat`` and ``shuffle`` resemble the corruptions the trainer's
optional ``degenerate_weight`` term uses (which work on tokens, not words); ``salad`` and
``thanks`` are not among them.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tokenreward_service.demo import MODEL_DIR
from tokenreward_service.demo.data import LABELS, Example, encode, load_corpus, split_by_text
from tokenreward_service.demo.evaluate import score_texts

__all__ = ["KINDS", "corrupt", "degenerate_preference", "main"]

KINDS = ("repeat", "shuffle", "salad", "thanks")
THANKS = " Thanks! Thanks! Thanks!"


def corrupt(text: str, kind: str, rng: random.Random, words: Sequence[str]) -> str:
    """``text`` made degenerate in the way ``kind`` names (see the module's docstring)."""
    split = text.split()
    if kind == "repeat":
        tail = split[-rng.randint(1, min(3, len(split))) :]
        return text + (" " + " ".join(tail)) * 3
    if kind == "shuffle":
        shuffled = split[:]
        for _ in range(10):
            rng.shuffle(shuffled)
            if shuffled != split:
                break
        return " ".join(shuffled)
    if kind == "salad":
        return text + " " + " ".join(rng.choice(words) for _ in range(5))
    if kind == "thanks":
        return text + THANKS
    raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")


def degenerate_preference(
    model: Any, tokenizer: Any, examples: Sequence[Example], *, seed: int = 0, max_tokens: int = 64
) -> dict[str, dict[str, float]]:
    """``{kind: {label: share of tweets scored above their copy, "all": ...}}``."""
    rng = random.Random(seed)
    usable = [e for e in examples if len(e.text.split()) >= 3]
    words = [w for e in usable for w in e.text.split()]
    originals = score_texts(model, [encode(tokenizer, e.text, max_tokens) for e in usable])
    out: dict[str, dict[str, float]] = {}
    for kind in KINDS:
        copies = [corrupt(e.text, kind, rng, words) for e in usable]
        # Room for what was added: the original's cut plus the copy's extra words.
        scored = score_texts(model, [encode(tokenizer, c, max_tokens * 2) for c in copies])
        wins = [float(o[-1]) > float(c[-1]) for o, c in zip(originals, scored, strict=True)]
        figures = {
            name: _share([w for w, e in zip(wins, usable, strict=True) if e.label == label])
            for name, label in LABELS.items()
        }
        figures["all"] = _share(wins)
        out[kind] = figures
    return out


def _share(values: Sequence[bool]) -> float:
    return sum(values) / len(values) if values else float("nan")


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", type=Path, default=MODEL_DIR)
    parser.add_argument("--count", type=int, default=1000, help="held-out tweets (default 1000)")
    args = parser.parse_args(argv)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model).eval()
    _, heldout = split_by_text(load_corpus(), seed=0, heldout_fraction=0.1)
    sample = random.Random(0).sample(heldout, min(args.count, len(heldout)))
    figures = degenerate_preference(model, tokenizer, sample)
    out(f"{args.model}: {len(sample)} held-out tweets; share scored above their degenerate copy")
    out(f"{'kind':<9}" + "".join(f"{name:>10}" for name in [*LABELS, "all"]))
    for kind, row in figures.items():
        out(f"{kind:<9}" + "".join(f"{row[name]:>10.3f}" for name in [*LABELS, "all"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
