"""Load a Hugging Face reward model and read its score head at every position in one pass.

A sequence-classification RM (``num_labels=1``) is a decoder with a linear ``score`` head that
HF reads at the last token. Running the decoder once and applying that same head (in float32)
to every position's hidden state gives the score of every prefix at the cost of one forward
pass; causality makes position ``i`` see exactly ``tokens[0..i]``, so the result equals running
each prefix separately. This module knows nothing of HTTP or batching.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenreward_service.errors import ModelLoadError

__all__ = [
    "BatchScores",
    "ModelSpec",
    "RewardModel",
    "load_reward_model",
    "resolve_device",
    "resolve_dtype",
]

log = logging.getLogger(__name__)

METADATA_FILE = "tokenreward.json"
"""Optional file in a model folder: ``{"suffix_ids": [2]}`` declares the trailing tokens."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class BatchScores:
    """Per-position scores of a batch, with what computing them cost."""

    scores: list[torch.Tensor]
    computed_tokens: int
    """Positions run through the model, padding included."""
    real_tokens: int
    """Tokens run through the model, padding excluded (a shared prompt counts once)."""
    shared_items: int
    """Items whose prompt was computed once for its whole group."""


@dataclass(frozen=True)
class ModelSpec:
    """What is loaded and how it runs; the server reports it at ``GET /v1/model``."""

    id: str
    revision: str
    architecture: str
    vocab_size: int
    max_length: int
    dtype: str
    device: str
    suffix_ids: tuple[int, ...]
    random_weights: bool = False


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


class RewardModel:
    """A loaded RM: ``score`` returns every position's score for a batch of sequences."""

    def __init__(
        self,
        model: Any,
        spec: ModelSpec,
        tokenizer: Any | None = None,
        *,
        share_prompts: bool = True,
    ) -> None:
        self._model = model
        self.spec = spec
        self.tokenizer = tokenizer
        self.share_prompts = share_prompts
        parameters = inspect.signature(model.base_model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        head = model.score
        self._device = torch.device(spec.device)
        self._head_weight = head.weight.detach().to(torch.float32)
        bias = getattr(head, "bias", None)
        self._head_bias = None if bias is None else bias.detach().to(torch.float32)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states ``[B, L, H]`` of the decoder, in the model's dtype."""
        out = self._model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        )
        hidden: torch.Tensor = out.last_hidden_state
        return hidden

    def score_padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, L]`` in float32 of right-padded ``input_ids``; padded positions are junk."""
        with torch.inference_mode():
            return self._head(self.hidden_states(input_ids, attention_mask))

    def score(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Per-position float32 scores (on CPU) of each sequence, in one forward pass.

        Sequences are right-padded to the longest with an attention mask, so a sequence's
        scores do not depend on the others in the batch (up to float rounding).
        """
        scores, _ = self._score_padded_batch(sequences)
        return scores

    def score_batch(
        self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]
    ) -> BatchScores:
        """Like :meth:`score`, but items that share a prompt have it computed once.

        Items whose first ``prompt_lens[i]`` tokens are identical (at least two of them, and a
        prompt of at least :data:`MIN_SHARED_PROMPT` tokens) form a group: the prompts run once,
        with their key/value cache, and each response then runs against its prompt's cache.
        Everything else runs as one right-padded batch. The scores are the same either way (up
        to float rounding), since a causal model computes a prompt's positions identically
        whatever follows it.
        """
        groups, singles = (
            find_shared_prompts(sequences, prompt_lens) if self.share_prompts else ([], [])
        )
        if not groups:
            scores, computed = self._score_padded_batch(sequences)
            real = sum(len(seq) for seq in sequences)
            return BatchScores(
                scores=scores, computed_tokens=computed, real_tokens=real, shared_items=0
            )
        out: list[torch.Tensor | None] = [None] * len(sequences)
        computed = 0
        if singles:
            single_scores, computed = self._score_padded_batch([sequences[i] for i in singles])
            for index, row in zip(singles, single_scores, strict=True):
                out[index] = row
        grouped, grouped_computed = self._score_shared(sequences, prompt_lens, groups)
        for index, row in grouped.items():
            out[index] = row
        done = [s for s in out if s is not None]
        assert len(done) == len(sequences)
        real = sum(len(sequences[i]) for i in singles)
        real += sum(prompt_lens[g[0]] for g in groups)  # each shared prompt once
        real += sum(len(sequences[i]) - prompt_lens[i] for g in groups for i in g)
        return BatchScores(
            scores=done,
            computed_tokens=computed + grouped_computed,
            real_tokens=real,
            shared_items=sum(len(g) for g in groups),
        )

    def _score_padded_batch(
        self, sequences: Sequence[Sequence[int]]
    ) -> tuple[list[torch.Tensor], int]:
        lengths = [len(seq) for seq in sequences]
        input_ids, attention_mask = _right_pad(sequences)
        scores = self.score_padded(
            input_ids.to(self._device, non_blocking=True),
            attention_mask.to(self._device, non_blocking=True),
        ).cpu()
        return [scores[row, :n] for row, n in enumerate(lengths)], int(input_ids.numel())

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(
            hidden.to(torch.float32), self._head_weight, self._head_bias
        )
        return logits.squeeze(-1)

    def _score_shared(
        self,
        sequences: Sequence[Sequence[int]],
        prompt_lens: Sequence[int],
        groups: list[list[int]],
    ) -> tuple[dict[int, torch.Tensor], int]:
        """Two passes: every group's prompt once (keeping the key/value cache), then every
        grouped item's response against its own prompt's cache rows."""
        prompts = [sequences[group[0]][: prompt_lens[group[0]]] for group in groups]
        prompt_ids, prompt_mask = _right_pad(prompts)
        members = [index for group in groups for index in group]
        owner = torch.tensor([g for g, group in enumerate(groups) for _ in group], dtype=torch.long)
        responses = [sequences[index][prompt_lens[index] :] for index in members]
        response_ids, response_mask = _right_pad(responses)
        plen = torch.tensor([prompt_lens[index] for index in members], dtype=torch.long)
        positions = plen.unsqueeze(1) + torch.arange(response_ids.shape[1]).unsqueeze(0)
        device = self._device
        with torch.inference_mode():
            first = self._model.base_model(
                input_ids=prompt_ids.to(device),
                attention_mask=prompt_mask.to(device),
                use_cache=True,
            )
            prompt_scores = self._head(first.last_hidden_state).cpu()
            cache = (
                first.cache if getattr(first, "cache", None) is not None else first.past_key_values
            )
            cache.reorder_cache(owner.to(device))  # one row of prompt keys/values per item
            second = self._model.base_model(
                input_ids=response_ids.to(device),
                attention_mask=torch.cat([prompt_mask[owner], response_mask], dim=1).to(device),
                position_ids=positions.to(device),
                use_cache=True,
                **{self._cache_kwarg: cache},
            )
            response_scores = self._head(second.last_hidden_state).cpu()
        out = {}
        for row, index in enumerate(members):
            g = int(owner[row])
            p = prompt_lens[index]
            r = len(sequences[index]) - p
            out[index] = torch.cat([prompt_scores[g, :p], response_scores[row, :r]])
        return out, int(prompt_ids.numel() + response_ids.numel())


MIN_SHARED_PROMPT = 8
"""Shorter prompts are not worth a second forward call: they are recomputed per item."""


def find_shared_prompts(
    sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]
) -> tuple[list[list[int]], list[int]]:
    """Indices grouped by identical prompt (groups of two or more), and the indices left alone."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    singles: list[int] = []
    for index, (seq, p) in enumerate(zip(sequences, prompt_lens, strict=True)):
        if p < MIN_SHARED_PROMPT or p >= len(seq):
            singles.append(index)
        else:
            by_prompt.setdefault(tuple(seq[:p]), []).append(index)
    groups = []
    for members in by_prompt.values():
        if len(members) >= 2:
            groups.append(members)
        else:
            singles.extend(members)
    return groups, sorted(singles)


def _right_pad(sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(seq) for seq in sequences)
    input_ids = torch.zeros((len(sequences), width), dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


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
