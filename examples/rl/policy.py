"""Pre-train the RL example's policy: a SentencePiece-style tokenizer and a small Llama-shaped
causal LM on the demo RM's tweet corpus (its training split), seeded and reproducible.

    python examples/rl/policy.py --out build/rl/policy            # about 2 minutes on 2 cores
    python examples/rl/policy.py --out /tmp/p --steps 30 --hidden 32   # seconds: the smoke test's

A folder that already holds a policy trained with the same recipe is reused as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import BOS, EOS, UNK, quiet_transformers

from tokenreward_service.demo.data import load_corpus, split_by_text
from tokenreward_service.model import right_pad


@dataclasses.dataclass(frozen=True)
class PolicyRecipe:
    seed: int = 0
    vocab_size: int = 2048
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    max_tokens: int = 40
    batch_size: int = 64
    steps: int = 900
    lr: float = 3e-3


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """BPE over ``▁``-marked words with byte fallback (``<0x00>`` .. ``<0xFF>``), BOS added by the
    post-processor: the shape of Llama 2's and Mistral's tokenizers, learnt on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    learner = Tokenizer(models.BPE(unk_token=UNK))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    learner.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size - len(bytes_),
            min_frequency=2,
            special_tokens=[UNK, BOS, EOS],
            show_progress=False,
        ),
    )
    learnt = json.loads(learner.to_str())["model"]
    vocab = dict(learnt["vocab"])
    for piece in bytes_:
        vocab.setdefault(piece, len(vocab))
    pairs = (m.split(" ") if isinstance(m, str) else m for m in learnt["merges"])
    merges: list[tuple[str, str]] = [(first, second) for first, second in pairs]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=UNK, byte_fallback=True))
    tok.add_special_tokens([UNK, BOS, EOS])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, bos)]
    )
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=UNK
    )


def train_policy(recipe: PolicyRecipe, out: Path, log: Any = print) -> dict[str, Any]:

    started = time.perf_counter()
    quiet_transformers()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # fixed, so that the sums add up in the same order on any machine
    try:
        return _train(recipe, out, log, started)
    finally:
        torch.set_num_threads(threads)


def _train(recipe: PolicyRecipe, out: Path, log: Any, started: float) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    train, heldout = split_by_text(load_corpus(), seed=0, heldout_fraction=0.1)
    texts = [e.text for e in train]
    tokenizer = train_tokenizer(texts, recipe.vocab_size)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    seqs = [[*ids[: recipe.max_tokens - 1], eos] for ids in tokenizer(texts)["input_ids"]]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden,
        intermediate_size=recipe.hidden * 3,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    optimiser = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(recipe.seed)
    model.train()
    losses: list[float] = []
    for step in range(recipe.steps):
        lr = (
            recipe.lr
            * min(1.0, (step + 1) / 50)
            * 0.5
            * (1 + math.cos(math.pi * step / recipe.steps))
        )
        for group in optimiser.param_groups:
            group["lr"] = lr
        picks = torch.randint(len(seqs), (recipe.batch_size,), generator=gen).tolist()
        ids, mask = right_pad([seqs[i] for i in picks])
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == recipe.steps:
            elapsed = time.perf_counter() - started
            eta = elapsed / (step + 1) * (recipe.steps - step - 1)
            recent = sum(losses[-100:]) / len(losses[-100:])
            log(f"policy LM step {step + 1}/{recipe.steps}: loss {recent:.3f}, ETA {eta:.0f} s")
    model.eval()  # type: ignore[no-untyped-call]
    heldout_loss = _heldout_loss(model, tokenizer, [e.text for e in heldout[:512]], recipe)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = {
        "recipe": dataclasses.asdict(recipe),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_loss_last_100": sum(losses[-100:]) / len(losses[-100:]),
        "heldout_loss": heldout_loss,
        "seconds": time.perf_counter() - started,
    }
    (out / "policy_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _heldout_loss(model: Any, tokenizer: Any, texts: list[str], recipe: PolicyRecipe) -> float:
    eos = tokenizer.convert_tokens_to_ids(EOS)
    seqs = [[*ids[: recipe.max_tokens - 1], eos] for ids in tokenizer(texts)["input_ids"]]
    ids, mask = right_pad(seqs)
    with torch.no_grad():
        return float(
            model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        )


def ensure_policy(recipe: PolicyRecipe, out: Path, log: Any = print) -> Path:
    """``out`` holding a policy of ``recipe``: trained now unless it is already there."""
    report = out / "policy_report.json"
    if report.exists() and json.loads(report.read_text())["recipe"] == dataclasses.asdict(recipe):
        log(f"policy: reusing {out}")
        return out
    log(f"policy: training into {out}")
    result = train_policy(recipe, out, log)
    log(
        f"policy: {result['parameters']:,} parameters, held-out loss {result['heldout_loss']:.3f}, "
        f"{result['seconds']:.0f} s"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    for field in dataclasses.fields(PolicyRecipe):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default
        )
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    recipe = PolicyRecipe(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(PolicyRecipe)}
    )
    ensure_policy(recipe, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
