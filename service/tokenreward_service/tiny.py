"""Tiny reward models of real Hugging Face architectures, with random weights.

Used where no trained model is at hand: the tests (every supported architecture, loaded through
the real path after ``save_pretrained``) and the random fallback model of ``serve``. A model
built here knows nothing useful; whoever serves one must say its weights are random.

Besides sequence-classification RMs, it builds the other formats reward models are published
in, each as its trainer builds and saves it: OpenRLHF's (:func:`save_openrlhf_reward_model`),
TRL's value-head model (:func:`save_trl_value_head_model`), a custom architecture with its own
code (:func:`save_gated_reward_model`), and a plain causal LM (:func:`save_causal_lm`, which
has no head and must be refused).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ARCHITECTURES",
    "save_causal_lm",
    "save_gated_reward_model",
    "save_openrlhf_reward_model",
    "save_tiny_reward_model",
    "save_trl_value_head_model",
    "tiny_config",
]

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
    num_labels: int | None = 1,
    sliding_window: int | None = None,
) -> Any:
    """A ``num_labels=1`` sequence-classification config of ``architecture``, small sizes.

    ``num_labels=None`` leaves the labels out, as a base LM's config does; ``sliding_window``
    (Mistral, Qwen2) makes every layer attend through a window of that many tokens.
    """
    from transformers import (
        BertConfig,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    common: dict[str, Any] = {"vocab_size": vocab_size, "pad_token_id": pad_token_id}
    if num_labels is not None:
        common["num_labels"] = num_labels
    if sliding_window is not None and architecture not in ("mistral", "qwen2"):
        raise ValueError(f"sliding_window is for mistral and qwen2, not {architecture}")
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
        window: dict[str, Any] = {}
        if sliding_window is not None:
            window = {
                "use_sliding_window": True,
                "sliding_window": sliding_window,
                "max_window_layers": 0,
            }
        return Qwen2Config(
            **common,
            **special,
            **decoder,
            **window,
            num_key_value_heads=num_kv_heads or max(1, num_heads // 2),
        )
    if architecture == "mistral":
        return MistralConfig(
            **common,
            **special,
            **decoder,
            num_key_value_heads=num_kv_heads or max(1, num_heads // 2),
            sliding_window=sliding_window,
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
    with _seeded(seed):
        model = AutoModelForSequenceClassification.from_config(config)  # type: ignore[no-untyped-call]
        # HF initialises the score head with a tiny std; widen it so differences between
        # prefixes are well above float32 noise in tests.
        with torch.no_grad():
            head = model.score if hasattr(model, "score") else model.classifier
            head.weight.normal_(0.0, 1.0)
    out = Path(path)
    model.save_pretrained(out)
    return out


def save_openrlhf_reward_model(
    path: str | Path,
    architecture: str = "llama",
    *,
    seed: int = 0,
    value_head_prefix: str = "score",
    normalize_reward: bool = False,
    mean: float | None = None,
    std: float | None = None,
    **sizes: Any,
) -> Path:
    """A random tiny RM in OpenRLHF's on-disk format, built and saved as OpenRLHF 0.11.2 does.

    ``openrlhf/models/model.py``: ``get_llm_for_sequence_regression`` sets
    ``config.normalize_reward``, takes ``AutoModel._model_mapping[type(config)]`` (the
    backbone class) and its base class, and ``_get_reward_model`` builds ``RewardModel`` on
    them: the backbone under ``base_model_prefix``, ``nn.Linear(hidden, 1, bias=False)`` set as
    attribute ``value_head_prefix``, non-persistent ``mean``/``std`` buffers read from the
    config. ``trainer/rm_trainer.py`` writes ``config.mean``/``config.std`` after evaluating;
    ``cli/train_rm.py`` writes ``config.value_head_prefix``; ``strategy.save_model`` calls
    ``save_pretrained`` and writes ``config.json`` again. ``normalize_reward`` is what the
    saving process was loaded with (``False`` for ``train_rm``).
    """
    from transformers import AutoModel

    config = tiny_config(architecture, num_labels=None, **sizes)
    config.normalize_reward = normalize_reward
    base_class: Any = AutoModel._model_mapping[type(config)]
    base_pretrained_class = base_class.__base__

    class RewardModel(base_pretrained_class):  # type: ignore[misc,valid-type]
        supports_gradient_checkpointing = True

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            setattr(self, self.base_model_prefix, base_class(config))
            self.value_head_prefix = value_head_prefix
            setattr(self, value_head_prefix, torch.nn.Linear(config.hidden_size, 1, bias=False))
            self.normalize_reward = config.normalize_reward
            self.register_buffer("mean", torch.zeros(1), persistent=False)
            self.register_buffer("std", torch.ones(1), persistent=False)
            if hasattr(config, "mean"):
                self.mean[0] = config.mean
                self.std[0] = config.std
            self.post_init()

    with _seeded(seed):
        model = RewardModel(config)
        with torch.no_grad():  # "trained": scores well above float32 noise
            getattr(model, value_head_prefix).weight.normal_(0.0, 1.0)
    if mean is not None or std is not None:
        model.config.mean = 0.0 if mean is None else mean
        model.config.std = 1.0 if std is None else std
    model.config.value_head_prefix = value_head_prefix
    out = Path(path)
    model.save_pretrained(out)
    model.config.to_json_file(str(out / "config.json"))
    return out


def save_trl_value_head_model(
    path: str | Path,
    architecture: str = "llama",
    *,
    seed: int = 0,
    max_shard_size: str | None = None,
    **sizes: Any,
) -> Path:
    """A random tiny causal LM with TRL's value head, saved as TRL 0.11.4 saves it.

    ``trl/models/modeling_value_head.py``: ``AutoModelForCausalLMWithValueHead`` holds the LM as
    ``pretrained_model`` and ``v_head = ValueHead(config)`` whose ``summary`` is
    ``nn.Linear(hidden, 1)``; its ``state_dict`` is the LM's plus ``v_head.summary.weight`` and
    ``v_head.summary.bias``; ``modeling_base.py``'s ``save_pretrained`` hands that state dict to
    the LM's ``save_pretrained``. With ``max_shard_size`` the value head (last in the state
    dict) lands in a shard file of its own.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(architecture, num_labels=None, **sizes)
    with _seeded(seed):
        lm = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
        summary = torch.nn.Linear(config.hidden_size, 1)
        with torch.no_grad():
            summary.weight.normal_(0.0, 1.0)
            summary.bias.normal_(0.0, 1.0)
    state = lm.state_dict()
    for name, tensor in summary.state_dict().items():
        state[f"v_head.summary.{name}"] = tensor
    out = Path(path)
    extra = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    lm.save_pretrained(out, state_dict=state, **extra)
    return out


def save_causal_lm(path: str | Path, architecture: str = "llama", *, seed: int = 0) -> Path:
    """A random tiny causal LM saved as is: a language model with no reward head."""
    from transformers import AutoModelForCausalLM

    with _seeded(seed):
        lm = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            tiny_config(architecture, num_labels=None)
        )
    out = Path(path)
    lm.save_pretrained(out)
    return out


def save_gated_reward_model(
    path: str | Path, *, seed: int = 0, num_objectives: int = 3, **sizes: Any
) -> Path:
    """A random tiny gated multi-objective RM with its own code: the folder holds
    ``modeling_gated_rm.py`` and ``config.json`` maps ``AutoConfig`` and
    ``AutoModelForSequenceClassification`` to it, so it loads only with trust_remote_code."""
    from tokenreward_service.adapters import modeling_gated_rm as code

    llama = tiny_config("llama", num_labels=None, **sizes).to_diff_dict()
    llama.pop("model_type", None)
    llama.pop("transformers_version", None)
    config = code.GatedRewardConfig(**llama)
    config.num_objectives = num_objectives
    with _seeded(seed):
        model = code.GatedRewardModel(config)
        with torch.no_grad():
            model.regression_layer.weight.normal_(0.0, 1.0)
            for layer in (model.gating[0], model.gating[2]):
                assert isinstance(layer, torch.nn.Linear)
                layer.weight.normal_(0.0, 1.0)
    out = Path(path)
    model.save_pretrained(out)
    module = Path(code.__file__).name
    saved = json.loads((out / "config.json").read_text())
    saved["auto_map"] = {
        "AutoConfig": f"{module[:-3]}.GatedRewardConfig",
        "AutoModelForSequenceClassification": f"{module[:-3]}.GatedRewardModel",
    }
    (out / "config.json").write_text(json.dumps(saved, indent=2))
    shutil.copyfile(code.__file__, out / module)
    return out


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Random weights from ``seed``, leaving the global generator as it was."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        yield
    finally:
        torch.random.set_rng_state(state)
