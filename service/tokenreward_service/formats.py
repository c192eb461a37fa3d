"""What a model folder holds, and so how to serve it: the on-disk formats reward models ship in,
and the head each one is read through.

Decided from ``config.json`` and the names in the weight files, before any weights load:

- ``sequence-classification``: ``architectures`` names a ``*ForSequenceClassification`` class;
  loaded as that class, its ``score`` module is the head.
- ``openrlhf``: ``value_head_prefix`` in the config, or ``architectures: ["RewardModel"]``
  (OpenRLHF's class name); the backbone loads with ``AutoModel``, the head is
  ``<value_head_prefix>.weight`` (default ``score``) in the weight files.
- ``trl-value-head``: ``v_head.summary.weight`` in the weight files (TRL's
  ``AutoModelForCausalLMWithValueHead``); the backbone loads with ``AutoModel``.
- ``custom-code``: an architecture only the folder's ``auto_map`` defines; loaded with its
  ``auto_map`` class under ``--trust-remote-code``, its ``score`` module is the head.
- ``adapter``: ``--adapter`` given; loaded as the class ``config.json`` names, scored by the
  adapter's function.

Everything else is refused here, with what was looked for and what to pass instead. The head
is chosen in two steps: :func:`choose_head` before the weights load (objective, normalisation,
the head's tensors when they sit in the weight files), :func:`build_head` after.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenreward_service.errors import ModelLoadError
from tokenreward_service.heads import (
    LinearHead,
    Normalization,
    Objective,
    choose_normalization,
    choose_objective,
    read_weights,
)

__all__ = [
    "TRL_HEAD",
    "HeadPlan",
    "Layout",
    "build_head",
    "choose_head",
    "detect_layout",
    "no_head_message",
    "openrlhf_suffix",
    "remote_code_class",
    "top_level",
]

log = logging.getLogger(__name__)

TRL_HEAD = "v_head.summary"
"""Where TRL's ``AutoModelForCausalLMWithValueHead`` keeps its value head in a state dict."""
OPENRLHF_DEFAULT_HEAD = "score"
"""OpenRLHF's ``value_head_prefix`` default (``--ds.value_head_prefix``)."""
_OPENRLHF_CLASSES = {"RewardModel": "reward", "CriticModel": "critic"}
"""The class names OpenRLHF's ``_get_reward_model``/``_get_critic_model`` give, which
``save_pretrained`` writes into ``architectures``."""
_AUTO_PREFERENCE = ("AutoModelForSequenceClassification", "AutoModelForCausalLM", "AutoModel")


@dataclass(frozen=True)
class Layout:
    """How to serve a model folder."""

    format: str
    """``sequence-classification``, ``openrlhf``, ``trl-value-head``, ``custom-code``,
    ``adapter``, or ``no-head`` (refused once loaded and checked for causality)."""
    architecture: str
    """As ``config.json`` names it."""
    loader: str
    """The transformers class (an ``Auto*`` class or a model class) that loads the weights."""
    head: str | None
    """The linear head: a module attribute of the loaded model (``score``), or a name prefix in
    the weight files (``head_in_weights``); None when an adapter computes the scores."""
    head_in_weights: bool = False
    remote_code: bool = False


def detect_layout(
    folder: Path,
    config: Mapping[str, Any],
    names: Collection[str],
    *,
    trust_remote_code: bool,
    adapter: str | None,
) -> Layout:
    """The :class:`Layout` of ``folder``, from its ``config.json`` (as a plain mapping) and the
    tensor names in its weight files; :class:`ModelLoadError` for what cannot be served."""
    architectures = config.get("architectures") or []
    architecture = str(architectures[0]) if architectures else str(config.get("model_type", "?"))
    remote = remote_code_class(config)
    if remote is not None and not trust_remote_code:
        raise ModelLoadError(
            f"{folder} ships its own model code: config.json's auto_map maps "
            f"{remote[0]} to {remote[1]}, which transformers cannot load without running "
            "it. Pass --trust-remote-code to run it (it executes Python from the model folder: "
            "read it first), and --adapter MODULE:FUNCTION if its head is not a linear "
            "'score' layer on the last hidden state"
        )
    if config.get("is_encoder_decoder"):
        raise ModelLoadError(f"{architecture} is an encoder-decoder; serve a decoder-only RM")
    loader = _native_class(architecture) or "AutoModel"
    if remote is not None and remote[0] != "AutoConfig":
        loader = remote[0]
    if adapter is not None:
        return Layout("adapter", architecture, loader, None, remote_code=remote is not None)
    if remote is not None:
        return Layout("custom-code", architecture, loader, "score", remote_code=True)
    if "value_head_prefix" in config or architecture in _OPENRLHF_CLASSES:
        return _openrlhf(folder, config, names, architecture)
    if architecture.endswith("ForSequenceClassification"):
        return Layout(
            "sequence-classification", architecture, "AutoModelForSequenceClassification", "score"
        )
    if f"{TRL_HEAD}.weight" in names:
        return Layout("trl-value-head", architecture, "AutoModel", TRL_HEAD, head_in_weights=True)
    if _is_causal_lm(architecture):
        raise ModelLoadError(no_head_message(architecture, names))
    # No head, and maybe not a decoder at all (BERT): the loader checks causality first, so
    # that an encoder is refused for what it is rather than for a missing head.
    return Layout("no-head", architecture, "AutoModel", None)


@dataclass(frozen=True)
class HeadPlan:
    """The head as chosen before the weights load."""

    objective: Objective | None
    normalization: Normalization | None
    weights: dict[str, torch.Tensor]
    """The head's tensors, when they are read from the weight files (else empty)."""


def choose_head(
    layout: Layout,
    raw: dict[str, Any],
    config: Any,
    names: dict[str, Path],
    *,
    objective: int | None,
    objective_weights: Sequence[float] | None,
    normalize_reward: bool | None,
    adapter: bool,
) -> HeadPlan:
    """What is decided before the weights load, so that a wrong choice costs no load: the
    objective (from the config's labels, or the head's shape in the weight files), the
    normalisation, and the head's tensors when they are read from the files. ``adapter``:
    an adapter computes the scores (no objective, no normalisation)."""
    where = layout.architecture
    if adapter and (objective is not None or objective_weights is not None):
        raise ModelLoadError(
            "--objective/--objective-weights choose a column of a linear head; with --adapter "
            "the adapter computes the one score itself"
        )
    normalization = choose_normalization(raw, normalize_reward, where=where)
    if adapter and normalization is not None:
        if normalize_reward:
            raise ModelLoadError("--normalize-reward applies to linear heads, not to an adapter")
        log.warning("config.json asks for normalize_reward; the adapter's scores are used as is")
        normalization = None
    chosen: Objective | None = None
    if layout.format == "sequence-classification":
        labels = [str(v) for _, v in sorted((config.id2label or {}).items())]
        chosen = choose_objective(
            int(config.num_labels),
            column=objective,
            weights=objective_weights,
            where=where,
            labels=labels,
        )
    head_weights: dict[str, torch.Tensor] = {}
    if layout.head_in_weights:
        assert layout.head is not None
        weight = f"{layout.head}.weight"
        bias = f"{layout.head}.bias"
        head_weights = read_weights(names, [weight, *([bias] if bias in names else [])])
        shape = head_weights[weight].shape
        outputs = shape[0] if len(shape) == 2 else 1
        chosen = choose_objective(outputs, column=objective, weights=objective_weights, where=where)
    return HeadPlan(chosen, normalization, head_weights)


def openrlhf_suffix(config: Any, tokenizer: Any | None) -> tuple[int, ...]:
    """OpenRLHF trains its RMs read at EOS: ``RewardDataset`` appends the EOS token to every
    text and sets the last ID to ``tokenizer.eos_token_id``. So, unless the settings or
    ``tokenreward.json`` say otherwise, that EOS is the suffix."""
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int):
        log.info("OpenRLHF reward model: read at its EOS token %d (suffix_ids)", eos)
        return (eos,)
    log.warning(
        "OpenRLHF reward models are trained read at EOS, but this one's EOS is %r; pass "
        "--suffix-ids to read it where it was trained",
        eos,
    )
    return ()


def build_head(
    layout: Layout,
    model: Any,
    plan: HeadPlan,
    *,
    objective: int | None,
    objective_weights: Sequence[float] | None,
    device: torch.device,
) -> LinearHead:
    """The linear head of the loaded ``model`` as ``plan`` says: read from the weight files,
    or the model's ``score`` module; refused when there is no linear head to read."""
    chosen, normalization, weights = plan.objective, plan.normalization, plan.weights
    architecture = type(model).__name__
    if layout.head_in_weights:
        assert layout.head is not None
        return LinearHead(
            weights[f"{layout.head}.weight"],
            weights.get(f"{layout.head}.bias"),
            objective=chosen,
            normalization=normalization,
            device=device,
        )
    module = getattr(model, layout.head or "score", None)
    if not isinstance(module, torch.nn.Linear):
        if layout.format == "custom-code":
            raise ModelLoadError(
                f"{architecture} (the folder's own code) has no linear 'score' head on the "
                "last hidden state to read at every position; pass --adapter MODULE:FUNCTION "
                "that computes its per-position scores (see tokenreward_service.adapters)"
            )
        raise ModelLoadError(f"{architecture} has no linear 'score' head")
    if layout.format == "custom-code":
        chosen = choose_objective(
            module.out_features, column=objective, weights=objective_weights, where=architecture
        )
    elif module.out_features != int(model.config.num_labels):
        raise ModelLoadError(
            f"{architecture}'s 'score' head has {module.out_features} outputs, its config "
            f"num_labels={model.config.num_labels}"
        )
    return LinearHead.from_module(module, objective=chosen, normalization=normalization)


def no_head_message(architecture: str, names: Collection[str]) -> str:
    """Why a model without a reward head is refused: what was looked for, what to do."""
    kind = "a causal language model" if _is_causal_lm(architecture) else "a model"
    return (
        f"{architecture} is {kind} without a reward head. Looked for: a sequence-"
        "classification model (architectures '*ForSequenceClassification', a linear 'score' "
        "head); OpenRLHF's value head (value_head_prefix in config.json, "
        f"'<prefix>.weight' in the weights); TRL's value head ('{TRL_HEAD}.weight'). Found "
        f"weights under: {top_level(names)}. Serve the reward model trained from it, or pass "
        "--adapter MODULE:FUNCTION to compute per-position scores from this model yourself "
        "(for example a reward token's logit)"
    )


def remote_code_class(config: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(auto class, "module.Class")`` when the architecture exists only as the folder's own
    code (``auto_map``), else None. A folder whose ``auto_map`` names a class transformers has
    anyway loads without remote code."""
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, Mapping):
        return None
    from transformers import CONFIG_MAPPING

    architectures = config.get("architectures") or []
    architecture = str(architectures[0]) if architectures else ""
    known_type = config.get("model_type") in CONFIG_MAPPING
    if known_type and architecture and _native_class(architecture) is not None:
        return None
    models = {
        key: str(value[0] if isinstance(value, list | tuple) else value)
        for key, value in auto_map.items()
        if key.startswith("AutoModel")
    }
    if not models:
        return None if known_type else ("AutoConfig", str(auto_map.get("AutoConfig")))
    named = [key for key, ref in models.items() if ref.rsplit(".", 1)[-1] == architecture]
    ordered = sorted(
        named or list(models),
        key=lambda k: _AUTO_PREFERENCE.index(k) if k in _AUTO_PREFERENCE else len(_AUTO_PREFERENCE),
    )
    return ordered[0], models[ordered[0]]


def _openrlhf(
    folder: Path, config: Mapping[str, Any], names: Collection[str], architecture: str
) -> Layout:
    """OpenRLHF (``openrlhf/models/model.py``): the backbone under its ``base_model_prefix``
    plus ``nn.Linear(hidden, 1, bias=False)`` set as attribute ``value_head_prefix``."""
    if _OPENRLHF_CLASSES.get(architecture) == "critic":
        raise ModelLoadError(
            f"{folder} is an OpenRLHF critic (CriticModel: PPO's value model), not a reward "
            "model; serve the reward model OpenRLHF's train_rm saved"
        )
    prefix = str(config.get("value_head_prefix", OPENRLHF_DEFAULT_HEAD))
    if f"{prefix}.weight" not in names:
        raise ModelLoadError(
            f"{folder} is in OpenRLHF's format (value_head_prefix={prefix!r}), but its weights "
            f"hold no '{prefix}.weight'. Found weights under: {top_level(names)}. Set "
            "value_head_prefix in config.json to the head's name"
        )
    return Layout("openrlhf", architecture, "AutoModel", prefix, head_in_weights=True)


def _is_causal_lm(architecture: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return architecture.endswith(("ForCausalLM", "LMHeadModel")) or (
        architecture in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    )


def _native_class(architecture: str) -> str | None:
    import transformers

    return architecture if hasattr(transformers, architecture) else None


def top_level(names: Collection[str], most: int = 8) -> str:
    """``model.*, score.weight``: what a folder's weights hold, at a glance."""
    tops: dict[str, int] = {}
    for name in names:
        head, _, rest = name.partition(".")
        key = f"{head}.*" if rest and "." in rest else name
        tops[key] = tops.get(key, 0) + 1
    if not tops:
        return "(no weight files)"
    shown = sorted(tops)[:most]
    more = f" and {len(tops) - most} more" if len(tops) > most else ""
    return ", ".join(shown) + more
