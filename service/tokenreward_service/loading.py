"""Load a local Hugging Face reward model and check that it can be served.

Refusals happen here, at load time, with a message that says why: a model with more than one
label, an encoder-decoder, a bidirectional encoder (its prefix scores would see the future), no
linear ``score`` head, a ``max_length`` beyond its positions, suffix IDs outside its vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tokenreward_service.errors import ModelLoadError
from tokenreward_service.model import ModelSpec, RewardModel

__all__ = ["content_revision", "load_reward_model", "resolve_device", "resolve_dtype"]

log = logging.getLogger(__name__)

METADATA_FILE = "tokenreward.json"
"""Optional file in a model folder: ``{"suffix_ids": [2]}`` declares the trailing tokens."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA where available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def content_revision(path: Path) -> str:
    """``sha256:`` of the weight files and config, in name order: what was really loaded.

    Two folders with the same weights and config have the same revision wherever they live;
    retraining or editing the config changes it.
    """
    digest = hashlib.sha256()
    files = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and (p.suffix in _WEIGHT_SUFFIXES or p.name == "config.json")
    )
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _check_causal(model: Any, vocab_size: int, device: torch.device) -> None:
    """Refuse a model whose positions see later tokens: prefix scores would be meaningless.

    Two sequences that share their first tokens must give the same hidden states there. Checked
    empirically so it holds for any architecture, whatever its config claims.
    """
    generator = torch.Generator().manual_seed(1234)
    base = torch.randint(3, max(4, vocab_size), (1, 12), generator=generator)
    other = base.clone()
    other[0, 8:] = (base[0, 8:] + 1 + torch.arange(4)) % vocab_size
    ids = torch.cat([base, other]).to(device)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        hidden = model.base_model(
            input_ids=ids, attention_mask=mask, use_cache=False
        ).last_hidden_state
    hidden = hidden.to(torch.float32)
    shared = (hidden[0, :8] - hidden[1, :8]).abs().max().item()
    scale = max(1.0, hidden[:, :8].abs().max().item())
    tolerance = 1e-4 if hidden.dtype == torch.float32 and model.dtype == torch.float32 else 2e-2
    if not shared <= tolerance * scale:
        raise ModelLoadError(
            f"{type(model).__name__} is not causal: the hidden state of a position changes when "
            f"later tokens change (max difference {shared:.3g}). A bidirectional encoder such as "
            "BERT cannot give prefix scores in one pass; serve a decoder-only reward model."
        )


def _read_metadata(path: Path) -> dict[str, Any]:
    file = path / METADATA_FILE
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file} must hold a JSON object")
    return data


def _load_tokenizer(path: Path) -> Any | None:
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_reward_model(
    path: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    max_length: int | None = None,
    suffix_ids: Sequence[int] | None = None,
    model_id: str | None = None,
    random_weights: bool = False,
    share_prompts: bool = True,
) -> RewardModel:
    """Load a local HF sequence-classification RM and check that it can be served.

    Refused with :class:`ModelLoadError`: anything but ``num_labels == 1``, encoder-decoders,
    bidirectional models, models without a ``score`` head, ``max_length`` beyond the model's
    positions, suffix IDs outside the vocabulary.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} is not a Hugging Face model folder (no config.json)")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    architecture = (config.architectures or [type(config).__name__])[0]
    if getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(f"{architecture} is an encoder-decoder; serve a decoder-only RM")
    if getattr(config, "num_labels", None) != 1:
        raise ModelLoadError(
            f"{architecture} has num_labels={config.num_labels}; a reward model has exactly one"
        )
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=torch_dtype, local_files_only=True
        )
    except ValueError as exc:
        raise ModelLoadError(
            f"cannot load {folder} as a sequence-classification model: {exc}"
        ) from exc
    model.to(torch_device).eval()
    vocab_size = int(model.get_input_embeddings().num_embeddings)
    _check_causal(model, vocab_size, torch_device)
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        raise ModelLoadError(f"{architecture} has no linear 'score' head with one output")

    model_max = getattr(config, "max_position_embeddings", None)
    if not isinstance(model_max, int) or model_max < 1:
        raise ModelLoadError(f"{architecture} does not say its maximum length; set max_length")
    if max_length is not None and max_length > model_max:
        raise ModelLoadError(f"max_length {max_length} exceeds the model's {model_max} positions")

    metadata = _read_metadata(folder)
    suffix = tuple(suffix_ids if suffix_ids is not None else metadata.get("suffix_ids", ()))
    for token in suffix:
        if not isinstance(token, int) or not 0 <= token < vocab_size:
            raise ModelLoadError(f"suffix id {token!r} is outside the vocabulary [0, {vocab_size})")

    spec = ModelSpec(
        id=model_id or metadata.get("id") or folder.resolve().name,
        revision=content_revision(folder),
        architecture=architecture,
        vocab_size=vocab_size,
        max_length=max_length or model_max,
        dtype=str(torch_dtype).removeprefix("torch."),
        device=str(torch_device),
        suffix_ids=suffix,
        random_weights=random_weights,
    )
    reward_model = RewardModel(model, spec, _load_tokenizer(folder), share_prompts=share_prompts)
    reward_model.score([[min(3, vocab_size - 1)] * 4])  # warm-up: first-call allocations
    log.info(
        "loaded %s (%s, %s on %s, revision %s, suffix %s)",
        spec.id,
        architecture,
        spec.dtype,
        spec.device,
        spec.revision[:19],
        list(suffix),
    )
    return reward_model
