"""Train the demo sentiment reward model from scratch: ``python -m tokenreward_service.demo.train``.

The service reads the score head at every prefix, so the model must be worth reading there, not
only at the EOS it is ranked at. Each part of the recipe stayed because it measured better on
held-out accuracy or on the credit measures of
:func:`~tokenreward_service.demo.evaluate.evaluate` (the report records both):

1. a byte-level BPE tokenizer and a one-epoch causal-LM warm-up on the training tweets, so that
   the decoder knows the words before it is asked to score them;
2. a Bradley–Terry loss on every pair of a batch with different labels (positive ≻ neutral ≻
   negative) and the same source collection, read at EOS: comparing within a collection keeps
   its topic ("flight", "Coachella") from being learnt as sentiment;
3. the same loss on random prefixes of those texts, which makes ``s_t`` an estimate of the final
   preference given the first ``t`` tokens: it moves where a word says something about the
   sentiment and stays flat where not, which is the credit the service hands out;
4. two anchors that Bradley–Terry leaves free: a neutral text's prefix and final scores stay at
   the BOS score (the service's baseline), so neutral words and topics get no net credit, and
   the EOS step stays small, since the service folds it into the last token.

5. sentiment words the tweets seldom hold (``word_weight``): adjectives of a published lexicon
   (:mod:`.words`) in neutral frames written for training, a positive word's text preferred to a
   neutral word's and that to a negative word's, at the word and at EOS, with a bounded margin
   (:attr:`Recipe.word_target`) so that these easy pairs do not stretch the score scale. It
   carries the credit to words the demo was never trained or tuned on
   (``python -m tokenreward_service.demo.lexicon``); its weight and the epochs were chosen over
   three seeds (``docs/demo-rm-recipes.json``).

``degenerate_weight`` (a text beats its degenerate copy) is there to try and is off in the
shipped model.

Everything is seeded and runs on two CPU threads with deterministic kernels: the same seed on
the same machine gives the same weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import distribution
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tokenreward_service.demo import MODEL_DIR
from tokenreward_service.demo.data import (
    EXAMPLES,
    Example,
    build_tokenizer,
    encode,
    load_corpus,
    split_by_text,
)
from tokenreward_service.demo.evaluate import credit, evaluate, pad_batch, prefix_scores
from tokenreward_service.demo.words import (
    TRAINING_FRAMES,
    WORDS_DISTRIBUTION,
    WORDS_FILE,
    WORDS_LICENSE,
    TrainingWords,
    training_words,
)

__all__ = ["Recipe", "main", "train"]

MODEL_ID = "tokenreward-demo-sentiment"
Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Every knob of a run (each is a flag of ``main``); the report records them."""

    seed: int = 0
    heldout_fraction: float = 0.1
    min_confidence: float = 0.0
    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 384
    layers: int = 4
    heads: int = 4
    max_text_tokens: int = 64  # training texts are cut there (a few tweets are longer)
    max_positions: int = 512  # what the service accepts; RoPE has no weights to learn
    batch_size: int = 64
    lm_epochs: float = 1.0
    lm_lr: float = 2e-3
    rm_epochs: float = 3.0
    rm_lr: float = 1e-3
    same_source_pairs: bool = True
    prefix_weight: float = 1.0
    prefixes_per_text: int = 8
    neutral_weight: float = 1.0
    eos_weight: float = 1.0
    heldout_sample: int = 300
    degenerate_weight: float = 0.0
    """Weight of "a text beats its degenerate copy" (a span of it repeated at its end, or its
    tokens shuffled): what a policy optimised against the RM tends to produce. 0: off."""
    word_weight: float = 0.75
    """Weight of the lexicon-word term (:mod:`.words`): in each training frame, a positive
    adjective's text beats a neutral one's, which beats a negative one's, at the word and at EOS;
    neutral words stay at the BOS score and the frame's tail adds nothing. 0: off."""
    word_min_polarity: float = 0.3
    word_target: float = 0.75
    """The word term's pair probability: a margin of ``logit(0.75) ≈ 1.1`` between classes at
    its optimum, the size of the credit the tweets give their clearest words."""
    word_frames: int = 4
    """Training frames per step; each gets ``words_per_class`` words of each class."""
    words_per_class: int = 2


def _config(recipe: Recipe, vocab_size: int) -> Any:
    from transformers import LlamaConfig

    config: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": recipe.hidden_size,
        "intermediate_size": recipe.intermediate_size,
        "num_hidden_layers": recipe.layers,
        "num_attention_heads": recipe.heads,
        "num_key_value_heads": recipe.heads,
        "max_position_embeddings": recipe.max_positions,
        **{"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "num_labels": 1},
        "tie_word_embeddings": True,  # the warm-up LM's head; the classifier has none
    }
    return LlamaConfig(**config)


def _plan(lengths: Sequence[int], epochs: float, size: int, gen: torch.Generator) -> list[Any]:
    """Batches for ``epochs`` passes; each pass is shuffled, then sorted by length within
    windows of 50 batches (little padding), then the batch order is shuffled."""
    batches: list[list[int]] = []
    for _ in range(math.ceil(epochs)):
        order = torch.randperm(len(lengths), generator=gen).tolist()
        chunks = [
            sorted(order[start : start + 50 * size], key=lambda i: lengths[i])
            for start in range(0, len(order), 50 * size)
        ]
        passed = [c[i : i + size] for c in chunks for i in range(0, len(c), size)]
        batches += [passed[i] for i in torch.randperm(len(passed), generator=gen).tolist()]
    return batches[: int(len(batches) * epochs / math.ceil(epochs))]


def _optimise(
    model: Any, plan: list[Any], lr: float, loss_of: Callable[[list[int]], torch.Tensor], log: Log
) -> None:
    """AdamW with linear warm-up and cosine decay over ``plan``, clipped gradients."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, len(plan) // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / len(plan))),
    )
    model.train()
    for step, batch in enumerate(plan):
        loss = loss_of(batch)
        torch.autograd.backward(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if step % 200 == 0 or step == len(plan) - 1:
            log(f"{type(model).__name__} step {step + 1}/{len(plan)} loss {loss.item():.3f}")
    model.eval()


def _bradley_terry(
    scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, target: float = 1.0
) -> torch.Tensor:
    """Mean ``-log σ(s_i - s_j)`` over pairs with ``label_i > label_j`` in the same group.

    ``target`` < 1 asks for ``P(i ≻ j) = target`` instead of 1 (the loss
    ``-t log σ(d) - (1 - t) log σ(-d)``): its optimum is the margin ``logit(target)``, not an
    ever larger one, for pairs that are easy to tell apart."""
    pairs = (labels[:, None] > labels[None, :]) & (groups[:, None] == groups[None, :])
    if not bool(pairs.any()):
        return scores.sum() * 0.0
    margins = (scores[:, None] - scores[None, :])[pairs]
    return -(target * F.logsigmoid(margins) + (1.0 - target) * F.logsigmoid(-margins)).mean()


def _lm_warmup(config: Any, seqs: list[list[int]], recipe: Recipe, log: Log) -> dict[str, Any]:
    """Next-token training on the training tweets; returns the decoder's weights."""
    from transformers import LlamaForCausalLM

    lm = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(recipe.seed + 1)

    def loss_of(batch: list[int]) -> torch.Tensor:
        ids, mask, _ = pad_batch([seqs[i] for i in batch])
        out = lm(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        loss: torch.Tensor = out.loss
        return loss

    plan = _plan([len(s) for s in seqs], recipe.lm_epochs, recipe.batch_size, gen)
    _optimise(lm, plan, recipe.lm_lr, loss_of, log)
    return dict(lm.model.state_dict())


def degenerate(seq: Sequence[int], gen: torch.Generator, max_length: int) -> list[int]:
    """A degenerate copy of ``[BOS] + text + [EOS]``: a span of 1 to 4 of its tokens repeated 2
    to 4 times at its end, or (one time in three) its text tokens shuffled."""
    body = list(seq[1:-1])
    if len(body) < 2:
        return [*seq[:-1], *body * 3, seq[-1]][:max_length]
    if int(torch.randint(3, (1,), generator=gen)) == 0:
        order = torch.randperm(len(body), generator=gen).tolist()
        shuffled = [body[i] for i in order]
        if shuffled != body:
            return [seq[0], *shuffled, seq[-1]]
    width = 1 + int(torch.randint(min(4, len(body)), (1,), generator=gen))
    start = int(torch.randint(len(body) - width + 1, (1,), generator=gen))
    times = 2 + int(torch.randint(3, (1,), generator=gen))
    tail = body[start : start + width] * times
    return [*[seq[0], *body, *tail][: max_length - 1], seq[-1]]


@dataclasses.dataclass(frozen=True)
class WordTexts:
    """Every training word in every training frame, encoded: ``texts[label][word][frame]`` is
    ``([BOS] + tokens + [EOS], position of the word's last token)``, label 0 / 1 / 2 for
    negative / neutral / positive."""

    texts: tuple[tuple[tuple[tuple[list[int], int], ...], ...], ...]


def word_texts(tokenizer: Any, words: TrainingWords) -> WordTexts:
    by_label = []
    for group in (words.negative, words.neutral, words.positive):
        jobs = [(word, frame) for word in group for frame in TRAINING_FRAMES]
        encoded = tokenizer(
            [frame.format(word) for word, frame in jobs], return_offsets_mapping=True
        )
        rows = []
        for (word, frame), ids, offsets in zip(
            jobs, encoded["input_ids"], encoded["offset_mapping"], strict=True
        ):
            start = frame.index("{}")
            end = start + len(word)
            last = max(i for i, (a, b) in enumerate(offsets) if i > 0 and a < end and b > start)
            rows.append(([*ids, tokenizer.eos_token_id], last))
        n = len(TRAINING_FRAMES)
        by_label.append(tuple(tuple(rows[i : i + n]) for i in range(0, len(rows), n)))
    return WordTexts(tuple(by_label))


def _word_loss(model: Any, texts: WordTexts, recipe: Recipe, gen: torch.Generator) -> torch.Tensor:
    """The lexicon-word term for one step (see :attr:`Recipe.word_weight`)."""
    frames = torch.randperm(len(TRAINING_FRAMES), generator=gen)[: recipe.word_frames].tolist()
    seqs, ends, labels, groups = [], [], [], []
    for slot, frame in enumerate(frames):
        for label, group in enumerate(texts.texts):
            picks = torch.randint(len(group), (recipe.words_per_class,), generator=gen)
            for word in picks.tolist():
                seq, end = group[word][frame]
                seqs.append(seq)
                ends.append(end)
                labels.append(label)
                groups.append(slot)
    ids, mask, lens = pad_batch(seqs)
    scores = prefix_scores(model, ids, mask)
    rows = torch.arange(len(seqs))
    at_word, final = scores[rows, torch.tensor(ends)], scores[rows, lens - 1]
    y, g = torch.tensor(labels), torch.tensor(groups)
    neutral = torch.cat([at_word[y == 1], final[y == 1]]) - scores[0, 0]
    return (
        _bradley_terry(at_word, y, g, recipe.word_target)
        + _bradley_terry(final, y, g, recipe.word_target)
        + neutral.pow(2).mean()
        + (final - at_word).pow(2).mean()
    )


def _train_rm(
    model: Any,
    seqs: list[list[int]],
    data: list[Example],
    recipe: Recipe,
    log: Log,
    words: WordTexts | None = None,
) -> None:
    """Bradley–Terry at EOS and at random prefixes, plus the neutral and EOS anchors, and the
    lexicon-word term when ``words`` are given."""
    sources = sorted({e.source for e in data})
    labels = torch.tensor([e.label for e in data])
    groups = torch.tensor([sources.index(e.source) for e in data])
    if not recipe.same_source_pairs:
        groups = torch.zeros_like(groups)
    gen = torch.Generator().manual_seed(recipe.seed + 2)
    k = recipe.prefixes_per_text
    # Its own generator, so that a recipe without the term draws exactly what it always drew.
    degenerate_gen = torch.Generator().manual_seed(recipe.seed + 3)
    word_gen = torch.Generator().manual_seed(recipe.seed + 4)

    def loss_of(batch: list[int]) -> torch.Tensor:
        ids, mask, lens = pad_batch([seqs[i] for i in batch])
        scores = prefix_scores(model, ids, mask)
        rows, y, g = torch.arange(len(batch)), labels[batch], groups[batch]
        final = scores[rows, lens - 1]
        # k random prefixes [BOS, t_1..t_j] per text, 1 <= j <= n (positions 1..n).
        pos = 1 + (torch.rand((len(batch), k), generator=gen) * (lens[:, None] - 2)).long()
        picked = scores[rows[:, None], pos]
        rep = torch.repeat_interleave
        prefix = _bradley_terry(picked.reshape(-1), rep(y, k), rep(g, k))
        neutral = torch.cat([picked, final[:, None]], dim=1)[y == 1] - scores[0, 0]
        anchor = neutral.pow(2).mean() if neutral.numel() else final.sum() * 0.0
        eos_step = (final - scores[rows, lens - 2]).pow(2).mean()
        loss = (
            _bradley_terry(final, y, g)
            + recipe.prefix_weight * prefix
            + recipe.neutral_weight * anchor
            + recipe.eos_weight * eos_step
        )
        if recipe.degenerate_weight > 0:
            half = batch[: max(1, len(batch) // 2)]
            copies = [degenerate(seqs[i], degenerate_gen, recipe.max_positions) for i in half]
            c_ids, c_mask, c_lens = pad_batch(copies)
            copy_final = prefix_scores(model, c_ids, c_mask)[torch.arange(len(half)), c_lens - 1]
            worse = -F.logsigmoid(final[: len(half)] - copy_final).mean()
            loss = loss + recipe.degenerate_weight * worse
        if words is not None:
            loss = loss + recipe.word_weight * _word_loss(model, words, recipe, word_gen)
        return loss

    plan = _plan([len(s) for s in seqs], recipe.rm_epochs, recipe.batch_size, gen)
    _optimise(model, plan, recipe.rm_lr, loss_of, log)


def train(recipe: Recipe, out: Path | None, log: Log) -> dict[str, Any]:
    """One full run; writes the checkpoint to ``out`` (unless None) and returns the report."""
    import transformers

    started = time.perf_counter()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(recipe.seed)
    seconds: dict[str, float] = {}

    def lap(name: str) -> None:
        seconds[name] = max(0.0, round(time.perf_counter() - started - sum(seconds.values()), 1))

    corpus = load_corpus()
    train_set, heldout = split_by_text(
        corpus, seed=recipe.seed, heldout_fraction=recipe.heldout_fraction
    )
    train_set = [e for e in train_set if e.confidence >= recipe.min_confidence]
    lap("data")
    texts, max_tokens = [e.text for e in train_set], recipe.max_text_tokens
    tokenizer = build_tokenizer(
        texts, vocab_size=recipe.vocab_size, max_length=recipe.max_positions
    )
    seqs = [encode(tokenizer, text, max_tokens) for text in texts]
    lap("tokenizer")
    config = _config(recipe, len(tokenizer))
    model = transformers.LlamaForSequenceClassification(config)  # type: ignore[no-untyped-call]
    if recipe.lm_epochs > 0:
        model.model.load_state_dict(_lm_warmup(config, seqs, recipe, log))
    lap("lm_warmup")
    chosen = training_words(recipe.word_min_polarity) if recipe.word_weight > 0 else None
    lexicon = None if chosen is None else word_texts(tokenizer, chosen)
    _train_rm(model, seqs, train_set, recipe, log, lexicon)
    lap("reward_training")
    metrics, sample = evaluate(
        model,
        tokenizer,
        heldout,
        max_text_tokens=recipe.max_text_tokens,
        seed=recipe.seed,
        sample_size=recipe.heldout_sample,
    )
    examples = {
        t: [(tok, round(r, 3)) for tok, r, _ in credit(model, tokenizer, t)] for t in EXAMPLES
    }
    lap("evaluation")
    params = sum(p.numel() for p in model.parameters())
    report: dict[str, Any] = {
        "id": MODEL_ID,
        "seed": recipe.seed,
        "recipe": dataclasses.asdict(recipe),
    }
    report["data"] = {"corpus": len(corpus), "train": len(train_set), "heldout": len(heldout)}
    if chosen is not None:
        report["data"]["words"] = {
            "distribution": WORDS_DISTRIBUTION,
            "version": distribution(WORDS_DISTRIBUTION).version,
            "file": WORDS_FILE,
            "license": WORDS_LICENSE,
            "positive": len(chosen.positive),
            "negative": len(chosen.negative),
            "neutral": len(chosen.neutral),
            "frames": len(TRAINING_FRAMES),
        }
    report |= {"heldout": metrics, "examples": examples, "seconds": seconds}
    report["model"] = {"parameters": params, "vocab_size": len(tokenizer)}
    report["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        model.config.architectures = [type(model).__name__]
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        metadata = {"id": MODEL_ID, "suffix_ids": [tokenizer.eos_token_id]}
        (out / "tokenreward.json").write_text(json.dumps(metadata) + "\n")
        (out / "heldout_sample.json").write_text(json.dumps(sample, indent=0) + "\n")
        report["model"]["weights_bytes"] = (out / "model.safetensors").stat().st_size
    lap("save")
    seconds["total"] = round(time.perf_counter() - started, 1)
    if out is not None:
        report["model"]["checkpoint_bytes"] = sum(p.stat().st_size for p in out.iterdir())
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _flag(default: object) -> Callable[[str], object]:
    if isinstance(default, bool):
        return lambda text: text.lower() in ("1", "true", "yes")
    return type(default)


def main(argv: Sequence[str] | None = None) -> int:
    """Train with the default recipe (flags override it), save, print the report as JSON."""
    parser = argparse.ArgumentParser(description="Train the demo sentiment reward model.")
    parser.add_argument("--out", type=Path, default=MODEL_DIR, help=f"default: {MODEL_DIR}")
    parser.add_argument("--no-save", action="store_true", help="train and report, save nothing")
    for field in dataclasses.fields(Recipe):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=_flag(field.default), default=field.default)
    args = parser.parse_args(argv)
    recipe = Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    report = train(recipe, None if args.no_save else args.out, log)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
