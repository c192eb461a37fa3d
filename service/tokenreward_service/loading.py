"""Load a local reward model, in whichever format it was published, and check it can be served.

The folder's format decides what loads (:mod:`tokenreward_service.formats`): a
sequence-classification model, OpenRLHF's or TRL's backbone plus value head, a custom
architecture (``--trust-remote-code``), or any model read by an adapter (``--adapter``).
Refusals happen here, at load time, with a message that says why and what to pass instead: a
multi-output head without ``--objective``/``--objective-weights``, an encoder-decoder, a
bidirectional encoder (its prefix scores would see the future), no head to be found, weights
missing from the files, custom code without ``--trust-remote-code``, a ``max_length`` beyond
its positions, suffix IDs outside its vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tokenreward_service.adapters import Adapter, load_adapter
from tokenreward_service.errors import ModelLoadError
from tokenreward_service.formats import (
    Layout,
    build_head,
    choose_head,
    detect_layout,
    no_head_message,
    openrlhf_suffix,
    top_level,
)
from tokenreward_service.heads import weight_names
from tokenreward_service.model import ModelSpec, RewardModel

__all__ = ["content_revision", "load_reward_model", "resolve_device", "resolve_dtype"]

log = logging.getLogger(__name__)

METADATA_FILE = "tokenreward.json"
"""Optional file in a model folder: ``{"suffix_ids": [2]}`` declares the trailing tokens."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_REVISION_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".py")
"""Weight files, and a custom architecture's own code."""


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
    """``sha256:`` of the weight files, config and model code, in name order: what was loaded.

    Two folders with the same weights and config have the same revision wherever they live;
    retraining or editing the config changes it.
    """
    digest = hashlib.sha256()
    files = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and (p.suffix in _REVISION_SUFFIXES or p.name == "config.json")
    )
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _check_causal(
    positions: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    name: str,
    vocab_size: int,
    device: torch.device,
    exact: bool,
) -> None:
    """Refuse a model whose positions see later tokens: prefix scores would be meaningless.

    Two sequences that share their first tokens must give the same outputs there (hidden
    states, or an adapter's scores). Checked empirically so it holds for any architecture,
    whatever its config claims.
    """
    generator = torch.Generator().manual_seed(1234)
    base = torch.randint(3, max(4, vocab_size), (1, 12), generator=generator)
    other = base.clone()
    other[0, 8:] = (base[0, 8:] + 1 + torch.arange(4)) % vocab_size
    ids = torch.cat([base, other]).to(device)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        out = positions(ids, mask).to(torch.float32)
    shared = (out[0, :8] - out[1, :8]).abs().max().item()
    scale = max(1.0, out[:, :8].abs().max().item())
    tolerance = 1e-4 if exact else 2e-2
    if not shared <= tolerance * scale:
        raise ModelLoadError(
            f"{name} is not causal: the output at a position changes when later tokens "
            f"change (max difference {shared:.3g}). A bidirectional encoder such as BERT "
            "cannot give prefix scores in one pass; serve a decoder-only (causal) reward model"
        )


def _hidden_positions(model: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def positions(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
        hidden: torch.Tensor = out.last_hidden_state
        return hidden

    return positions


def _adapter_positions(
    adapter: Adapter, model: Any
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def positions(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        try:
            scores = adapter.function(model, ids, mask)
        except Exception as exc:
            raise ModelLoadError(f"adapter {adapter.name!r} failed on a test batch: {exc}") from exc
        if not isinstance(scores, torch.Tensor) or scores.shape != ids.shape:
            shape = getattr(scores, "shape", type(scores).__name__)
            raise ModelLoadError(
                f"adapter {adapter.name!r} returned {shape} for input_ids of shape "
                f"{tuple(ids.shape)}; it must return one score per position, [batch, seq]"
            )
        return scores

    return positions


def _read_metadata(path: Path) -> dict[str, Any]:
    file = path / METADATA_FILE
    return _json_object(file) if file.is_file() else {}


def _json_object(file: Path) -> dict[str, Any]:
    """The JSON object in ``file``, or a load error saying what is wrong with it."""
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
    objective: int | None = None,
    objective_weights: Sequence[float] | None = None,
    normalize_reward: bool | None = None,
    trust_remote_code: bool = False,
    adapter: str | None = None,
) -> RewardModel:
    """Load a local reward model folder and check that it can be served.

    ``objective``/``objective_weights`` choose what a multi-output head redistributes;
    ``normalize_reward`` overrides ``config.json``'s ``normalize_reward`` (OpenRLHF);
    ``trust_remote_code`` lets a folder's own model code run; ``adapter`` (``module:function``
    or ``file.py:function``) computes the scores instead of a linear head. Refused with
    :class:`ModelLoadError`, saying what was looked for and what to pass instead.
    """
    folder = Path(path)
    raw = _read_config(folder)
    loaded_adapter = load_adapter(adapter) if adapter is not None else None
    names = weight_names(folder)
    layout = detect_layout(folder, raw, names, trust_remote_code=trust_remote_code, adapter=adapter)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        folder, local_files_only=True, trust_remote_code=layout.remote_code
    )
    plan = choose_head(
        layout,
        raw,
        config,
        names,
        objective=objective,
        objective_weights=objective_weights,
        normalize_reward=normalize_reward,
        adapter=loaded_adapter is not None,
    )

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    model = _load_weights(folder, layout, config, torch_dtype, names)
    model.to(torch_device).eval()
    if getattr(model, "base_model", None) is None:
        raise ModelLoadError(f"{type(model).__name__} has no base_model (the decoder) to run")
    vocab_size = int(model.get_input_embeddings().num_embeddings)
    exact = torch_dtype == torch.float32
    architecture = type(model).__name__
    if loaded_adapter is not None:
        positions = _adapter_positions(loaded_adapter, model)
        _check_causal(
            positions, f"{architecture} read by {adapter}", vocab_size, torch_device, exact
        )
    else:
        _check_causal(_hidden_positions(model), architecture, vocab_size, torch_device, exact)
    if layout.format == "no-head":
        raise ModelLoadError(no_head_message(layout.architecture, names))

    head = None
    if loaded_adapter is None:
        head = build_head(
            layout,
            model,
            plan,
            objective=objective,
            objective_weights=objective_weights,
            device=torch_device,
        )

    model_max = getattr(config, "max_position_embeddings", None)
    if not isinstance(model_max, int) or model_max < 1:
        raise ModelLoadError(f"{architecture} does not say its maximum length; set max_length")
    if max_length is not None and max_length > model_max:
        raise ModelLoadError(f"max_length {max_length} exceeds the model's {model_max} positions")

    metadata = _read_metadata(folder)
    tokenizer = _load_tokenizer(folder)
    if suffix_ids is None and "suffix_ids" not in metadata and layout.format == "openrlhf":
        suffix_ids = openrlhf_suffix(config, tokenizer)
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
        format=layout.format,
        head=f"adapter {adapter}" if adapter is not None else str(layout.head),
        objective=None if head is None or head.objective is None else head.objective.describe(),
        normalization=None if plan.normalization is None else plan.normalization.describe(),
    )
    reward_model = RewardModel(
        model,
        spec,
        tokenizer,
        share_prompts=share_prompts,
        head=head,
        adapter=None if loaded_adapter is None else loaded_adapter.function,
    )
    reward_model.score([[min(3, vocab_size - 1)] * 4])  # warm-up: first-call allocations
    log.info(
        "loaded %s (%s as %s, head %s%s%s, %s on %s, revision %s, suffix %s)",
        spec.id,
        architecture,
        spec.format,
        spec.head,
        f", objective {spec.objective}" if spec.objective else "",
        f", normalised {spec.normalization}" if spec.normalization else "",
        spec.dtype,
        spec.device,
        spec.revision[:19],
        list(suffix),
    )
    return reward_model


def _read_config(folder: Path) -> dict[str, Any]:
    file = folder / "config.json"
    if not file.is_file():
        raise ModelLoadError(f"{folder} is not a Hugging Face model folder (no config.json)")
    return _json_object(file)


def _load_weights(
    folder: Path, layout: Layout, config: Any, dtype: torch.dtype, names: dict[str, Path]
) -> Any:
    """The model ``layout.loader`` loads; refused if any of its weights are not in the files
    (transformers would initialise them at random and only warn)."""
    import transformers

    loader = getattr(transformers, layout.loader)
    try:
        model, info = loader.from_pretrained(
            folder,
            config=config,
            dtype=dtype,
            local_files_only=True,
            trust_remote_code=layout.remote_code,
            output_loading_info=True,
        )
    except (ValueError, OSError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load {folder} as {layout.loader}: {exc}") from exc
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(repr(m) for m in missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise ModelLoadError(
            f"{folder}: loaded as {type(model).__name__}, its weights lack {shown} "
            f"({len(missing)} tensor(s)), which would be random. Found weights under: "
            f"{top_level(names)}"
        )
    return model
