"""Tiny reward models of real Hugging Face architectures, with random weights.

Used where no trained model is at hand: the tests (every supported architecture, loaded through
the real path after ``save_pretrained``) and the random fallback model of ``serve``. A model
built here knows nothing useful; whoever serves one must say its weights are random.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["ARCHITECTURES", "save_tiny_reward_model", "tiny_config"]

ARCHITECTURES = ("llama", "qwen2", "mistral", "gpt2", "gpt_neox", "bert")
"""Architectures :func:`tiny_config` knows; ``bert`` is bidirectional and must be refused."""


def tiny_config(
    architecture: str,
    *,
    vocab_size: int = 128,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 512,
    pad_token_id: int = 0,
    intermediate_size: int | None = None,
    num_kv_heads: int | None = None,
) -> Any:
    """A ``num_labels=1`` sequence-classification config of ``architecture``, small sizes."""
    from transformers import (
        BertConfig,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    common: dict[str, Any] = {
        "num_labels": 1,
        "vocab_size": vocab_size,
        "pad_token_id": pad_token_id,
    }
    special: dict[str, Any] = {"bos_token_id": 1, "eos_token_id": 2}
    decoder: dict[str, Any] = {
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size or 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "max_position_embeddings": max_positions,
    }
    if architecture == "llama":
        return LlamaConfig(
            **common,
            **special,
            **decoder,
            num_key_value_heads=num_kv_heads or max(1, num_heads // 2),
        )
    if architecture == "qwen2":
        return Qwen2Config(
            **common,
            **special,
            **decoder,
            num_key_value_heads=num_kv_heads or max(1, num_heads // 2),
        )
    if architecture == "mistral":
        return MistralConfig(
            **common,
            **special,
            **decoder,
            num_key_value_heads=num_kv_heads or max(1, num_heads // 2),
            sliding_window=None,
        )
    if architecture == "gpt2":
        return GPT2Config(
            **common,
            **special,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=max_positions,
        )
    if architecture == "gpt_neox":
        return GPTNeoXConfig(**common, **special, **decoder)
    if architecture == "bert":
        return BertConfig(**common, **decoder)
    raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")


def save_tiny_reward_model(
    path: str | Path, architecture: str, *, seed: int = 0, **sizes: Any
) -> Path:
    """Build a random tiny RM of ``architecture`` and ``save_pretrained`` it to ``path``."""
    from transformers import AutoModelForSequenceClassification

    config = tiny_config(architecture, **sizes)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(config)  # type: ignore[no-untyped-call]
        # HF initialises the score head with a tiny std; widen it so differences between
        # prefixes are well above float32 noise in tests.
        with torch.no_grad():
            head = model.score if hasattr(model, "score") else model.classifier
            head.weight.normal_(0.0, 1.0)
    finally:
        torch.random.set_rng_state(generator_state)
    out = Path(path)
    model.save_pretrained(out)
    return out
