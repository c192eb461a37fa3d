"""Read the demo RM as the service does, and measure it: held-out pairwise accuracy, and how
sharply the per-token credit lands on the words that carry the sentiment.

:mod:`~tokenreward_service.demo.train` calls :func:`evaluate` at the end of a run and writes its
figures to the checkpoint's ``report.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tokenreward_service.demo.data import LABELS, NEUTRAL, PROBES, Example, encode

__all__ = [
    "credit",
    "evaluate",
    "pad_batch",
    "pairwise_accuracy",
    "prefix_scores",
    "probe_credit",
    "score_texts",
    "token_rewards",
]


def pad_batch(seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and lengths."""
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.zeros((len(seqs), int(lengths.max())), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    return ids, mask, lengths


def prefix_scores(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The score head at every position ``[B, L]``: what the service reads."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    scores: torch.Tensor = model.score(hidden).squeeze(-1)
    return scores


@torch.inference_mode()
def score_texts(model: Any, seqs: Sequence[Sequence[int]], batch: int = 256) -> list[torch.Tensor]:
    """Per-position scores (float64, CPU) of each sequence."""
    out: list[torch.Tensor] = []
    for start in range(0, len(seqs), batch):
        ids, mask, lens = pad_batch(seqs[start : start + batch])
        scores = prefix_scores(model, ids, mask).double()
        out += [scores[row, :n] for row, n in enumerate(lens.tolist())]
    return out


def pairwise_accuracy(better: Sequence[float], worse: Sequence[float]) -> float:
    """Share of (better, worse) pairs ranked right; ties count half (the AUC)."""
    b = torch.tensor(better, dtype=torch.float64)[:, None]
    w = torch.tensor(worse, dtype=torch.float64)[None, :]
    return float(((b > w).double() + 0.5 * (b == w).double()).mean())


def token_rewards(scores: Sequence[float]) -> list[float]:
    """Rewards of the text tokens from the scores of ``[BOS, t_1..t_n, EOS]``: ``s_t - s_{t-1}``,
    the baseline being the score at BOS and the EOS increment folded into ``t_n``."""
    rewards = [scores[t] - scores[t - 1] for t in range(1, len(scores) - 1)]
    rewards[-1] += scores[-1] - scores[-2]
    return rewards


def credit(model: Any, tokenizer: Any, text: str) -> list[tuple[str, float, tuple[int, int]]]:
    """(token, reward, character span) of each token of ``text``, read as the service does."""
    enc = tokenizer(text, return_offsets_mapping=True)
    scores = score_texts(model, [[*enc["input_ids"], tokenizer.eos_token_id]])[0].tolist()
    spans = enc["offset_mapping"][1:]
    return [(text[a:b], r, (a, b)) for (a, b), r in zip(spans, token_rewards(scores), strict=True)]


def probe_credit(model: Any, tokenizer: Any) -> dict[str, float]:
    """How sharply a sentiment word put in a neutral frame gets the credit.

    ``hit_rate``: the word's reward (its tokens summed) has the word's sign and the largest
    magnitude in the sentence; ``other_over_word``: mean |reward| of the other tokens over the
    mean |reward| of the sentiment words (small is sharp).
    """
    hits, words, others = 0, list[float](), list[float]()
    for frames, positive, negative in PROBES:
        signed = [(1, w) for w in positive] + [(-1, w) for w in negative]
        for frame, (sign, word) in ((f, sw) for f in frames for sw in signed):
            text = frame.format(word)
            start, end = text.index(word), text.index(word) + len(word)
            tokens = [(r, a < end and b > start) for _, r, (a, b) in credit(model, tokenizer, text)]
            reward = sum(r for r, inside in tokens if inside)
            rest = [abs(r) for r, inside in tokens if not inside]
            hits += int(sign * reward > 0 and abs(reward) >= max(rest, default=0.0))
            words.append(abs(reward))
            others += rest
    mean_word = sum(words) / len(words)
    return {
        "probes": len(words),
        "hit_rate": hits / len(words),
        "mean_word_reward": mean_word,
        "other_over_word": sum(others) / max(1, len(others)) / mean_word,
    }


def evaluate(
    model: Any,
    tokenizer: Any,
    heldout: list[Example],
    *,
    max_text_tokens: int,
    seed: int,
    sample_size: int,
) -> Any:
    """Held-out accuracies and credit measures, and a fixed random subset of held-out positives
    and negatives with its accuracy (shipped, so a test can check it without the corpus)."""
    scores = score_texts(model, [encode(tokenizer, e.text, max_text_tokens) for e in heldout])

    def at(index: int, label: int) -> list[float]:
        return [float(s[index]) for s, e in zip(scores, heldout, strict=True) if e.label == label]

    order = torch.randperm(len(heldout), generator=torch.Generator().manual_seed(seed))
    picked = [
        [i for i in order.tolist() if heldout[i].label == lab][:sample_size] for lab in (2, 0)
    ]
    sample = {
        name: [heldout[i].text for i in ids]
        for name, ids in zip(("positive", "negative"), picked, strict=True)
    }
    drift = [abs(sum(r for _, r, _ in credit(model, tokenizer, text))) for text in NEUTRAL]
    return {
        "size": {name: len(at(-1, label)) for name, label in LABELS.items()},
        "pos_vs_neg": pairwise_accuracy(at(-1, 2), at(-1, 0)),
        "pos_vs_neu": pairwise_accuracy(at(-1, 2), at(-1, 1)),
        "neu_vs_neg": pairwise_accuracy(at(-1, 1), at(-1, 0)),
        "pos_vs_neg_before_eos": pairwise_accuracy(at(-2, 2), at(-2, 0)),
        "sample_pos_vs_neg": pairwise_accuracy(
            *([float(scores[i][-1]) for i in ids] for ids in picked)
        ),
        # The EOS step's share of the score change from BOS (small: the text carries the score).
        "eos_share": float(
            sum(abs(s[-1] - s[-2]) for s in scores) / sum(abs(s[-1] - s[0]) for s in scores)
        ),
        # Mean |summed reward| of hand-written neutral sentences (small: no credit to hand out).
        "neutral_drift": sum(drift) / len(drift),
        "credit_probes": probe_credit(model, tokenizer),
    }, sample
