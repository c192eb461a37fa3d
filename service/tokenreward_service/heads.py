"""Reward heads: what turns a decoder's hidden states into one score per position.

A reward model's head is read at every position in float32 (see :mod:`tokenreward_service.model`).
It is a linear layer, wherever it was saved: the ``score`` module of a sequence-classification
model, OpenRLHF's value head (``<value_head_prefix>.weight``), TRL's ``v_head.summary``. Two
choices sit on top of it, both made once at load time:

- **Objective.** A head with ``K > 1`` outputs (a multi-objective RM) gives ``K`` scores per
  position, and a token reward needs one: ``--objective k`` redistributes column ``k``,
  ``--objective-weights w_0,...,w_{K-1}`` the weighted sum. Differences are linear, so the
  token rewards of a weighted sum are the weighted sum of each objective's token rewards.
- **Normalisation** (OpenRLHF's ``normalize_reward``): ``s' = (s - mean) / std`` with ``mean``
  and ``std`` from ``config.json``, applied to every prefix score as OpenRLHF applies it to the
  final one. Token rewards are differences, so they scale by ``1 / std`` and the mean cancels;
  only ``score``, ``prompt_score`` and ``prefix_scores`` (and, with ``baseline="zero"``, the
  first token's reward) keep the ``- mean / std`` shift.

The weight files are read here by name (safetensors or PyTorch ``.bin``, sharded or not), so a
head saved beside the backbone's weights is found whichever file holds it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenreward_service.errors import ModelLoadError

__all__ = [
    "LinearHead",
    "Normalization",
    "Objective",
    "choose_normalization",
    "choose_objective",
    "read_weights",
    "weight_names",
]


@dataclass(frozen=True)
class Objective:
    """Which output of a multi-output head is redistributed: one column, or a weighted sum."""

    column: int | None = None
    weights: tuple[float, ...] | None = None
    labels: tuple[str, ...] = ()
    """The head's label names (``id2label``), when they say more than ``LABEL_k``."""

    def describe(self) -> str:
        """What ``GET /v1/model`` reports, e.g. ``column 1 (helpfulness)``."""
        if self.weights is not None:
            return "weights " + ",".join(f"{w:g}" for w in self.weights)
        assert self.column is not None
        name = f" ({self.labels[self.column]})" if self.column < len(self.labels) else ""
        return f"column {self.column}{name}"


def choose_objective(
    outputs: int,
    *,
    column: int | None,
    weights: Sequence[float] | None,
    where: str,
    labels: Sequence[str] = (),
) -> Objective | None:
    """The objective to serve from a head with ``outputs`` columns, or None for a one-output
    head with nothing chosen. Refused: several outputs and no choice, both choices, an index
    out of range, a weight count that is not ``outputs``."""
    if column is not None and weights is not None:
        raise ModelLoadError("give --objective or --objective-weights, not both")
    names = tuple(labels) if any(n != f"LABEL_{i}" for i, n in enumerate(labels)) else ()
    if column is None and weights is None:
        if outputs == 1:
            return None
        listed = ", ".join(f"{i}={n}" for i, n in enumerate(names))
        raise ModelLoadError(
            f"{where} has num_labels={outputs}: {outputs} scores per position"
            + (f" ({listed})" if listed else "")
            + ", and a token reward needs one. Pass --objective K (0.."
            f"{outputs - 1}) to redistribute one of them, or --objective-weights "
            f"w0,...,w{outputs - 1} for a weighted sum"
        )
    if column is not None:
        if not 0 <= column < outputs:
            raise ModelLoadError(
                f"--objective {column} is out of range: {where} has {outputs} output(s), "
                f"0..{outputs - 1}"
            )
        return Objective(column=column, labels=names)
    assert weights is not None
    if len(weights) != outputs:
        raise ModelLoadError(
            f"--objective-weights has {len(weights)} weight(s); {where} has {outputs} outputs"
        )
    if not all(math.isfinite(w) for w in weights):
        raise ModelLoadError("--objective-weights must be finite numbers")
    return Objective(weights=tuple(float(w) for w in weights), labels=names)


@dataclass(frozen=True)
class Normalization:
    """OpenRLHF's reward normalisation: ``(score - mean) / std``."""

    mean: float
    std: float

    def describe(self) -> str:
        return f"(score - {self.mean:.6g}) / {self.std:.6g}"


def choose_normalization(
    config: Mapping[str, Any], enabled: bool | None, *, where: str
) -> Normalization | None:
    """The normalisation to apply, or None.

    ``enabled`` is the ``--normalize-reward`` setting; unset, ``config.json``'s own
    ``normalize_reward`` decides (what OpenRLHF's model class does with the config it is given;
    OpenRLHF's ``train_rm`` saves ``false`` there, and its ``serve_rm`` and PPO turn it on with
    ``--reward.normalize_enable``, which is ``--normalize-reward true`` here).
    """
    on = bool(config.get("normalize_reward", False)) if enabled is None else enabled
    if not on:
        return None
    mean, std = config.get("mean"), config.get("std")
    if mean is None or std is None:
        if enabled is None:
            # OpenRLHF's buffers default to mean 0 and std 1: normalising changes nothing.
            return None
        raise ModelLoadError(
            f"--normalize-reward true, but {where}'s config.json has no 'mean' and 'std' "
            "(OpenRLHF's train_rm writes them after its evaluation); leave normalisation off"
        )
    if not isinstance(mean, int | float) or not isinstance(std, int | float):
        raise ModelLoadError(f"config.json 'mean' and 'std' must be numbers, got {mean!r}, {std!r}")
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ModelLoadError(f"cannot normalise with mean={mean!r}, std={std!r}")
    return Normalization(mean=float(mean), std=float(std))


class LinearHead:
    """A linear head ``[K, H]`` applied in float32 to every position's hidden state, then
    reduced to one score per position (the objective) and normalised.

    Called with hidden states ``[B, L, H]`` in any dtype; returns float32 ``[B, L]``.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        objective: Objective | None = None,
        normalization: Normalization | None = None,
        device: torch.device | None = None,
    ) -> None:
        weight = weight.detach().to(device=device, dtype=torch.float32)
        bias = None if bias is None else bias.detach().to(device=device, dtype=torch.float32)
        if weight.ndim == 1:
            weight = weight.unsqueeze(0)
        if weight.ndim != 2 or (bias is not None and bias.shape != weight.shape[:1]):
            raise ModelLoadError(f"a linear head needs a [K, H] weight, got {tuple(weight.shape)}")
        outputs = weight.shape[0]
        self.outputs = outputs
        self.objective = objective
        self.normalization = normalization
        self._mix: torch.Tensor | None = None
        if objective is not None and objective.column is not None:
            column = objective.column
            weight = weight[column : column + 1]
            bias = None if bias is None else bias[column : column + 1]
        elif objective is not None and objective.weights is not None:
            if len(objective.weights) != outputs:
                raise ModelLoadError(f"{len(objective.weights)} weights for {outputs} outputs")
            self._mix = torch.tensor(objective.weights, dtype=torch.float32, device=device)
        elif outputs != 1:
            raise ModelLoadError(f"a head with {outputs} outputs needs an objective")
        self._weight = weight
        self._bias = bias

    @classmethod
    def from_module(
        cls,
        module: Any,
        *,
        objective: Objective | None = None,
        normalization: Normalization | None = None,
    ) -> LinearHead:
        """The head of a loaded ``torch.nn.Linear`` (e.g. a sequence-classification ``score``)."""
        if not isinstance(module, torch.nn.Linear):
            raise ModelLoadError(f"the head is a {type(module).__name__}, not a linear layer")
        return cls(
            module.weight,
            module.bias,
            objective=objective,
            normalization=normalization,
            device=module.weight.device,
        )

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.linear(hidden.to(torch.float32), self._weight, self._bias)
        scores = out.squeeze(-1) if self._mix is None else out @ self._mix
        if self.normalization is not None:
            scores = (scores - self.normalization.mean) / self.normalization.std
        return scores


_WEIGHT_GLOBS = ("*.safetensors", "*.bin")
_NOT_WEIGHTS = {"training_args.bin"}


def weight_names(folder: Path) -> dict[str, Path]:
    """Every tensor name in the folder's weight files, and the file that holds it.

    Reads safetensors headers and (memory-mapped) ``.bin`` state dicts; files that are not
    state dicts (a trainer's pickled arguments, optimizer states) are skipped.
    """
    from safetensors import safe_open

    names: dict[str, Path] = {}
    for file in _weight_files(folder):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                keys: Iterable[str] = list(handle.keys())
        else:
            state = _load_bin(file)
            if state is None:
                continue
            keys = list(state)
        for key in keys:
            names.setdefault(key, file)
    return names


def read_weights(names: Mapping[str, Path], wanted: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named tensors (on CPU, as stored), from whichever files hold them."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(names[name], []).append(name)
    for file, keys in by_file.items():
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                for key in keys:
                    out[key] = handle.get_tensor(key)
        else:
            state = _load_bin(file)
            assert state is not None
            for key in keys:
                out[key] = state[key].clone()
    return out


def _weight_files(folder: Path) -> list[Path]:
    files = {f for pattern in _WEIGHT_GLOBS for f in folder.glob(pattern) if f.is_file()}
    return sorted(f for f in files if f.name not in _NOT_WEIGHTS)


def _load_bin(file: Path) -> dict[str, torch.Tensor] | None:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a state dict torch can read safely: not ours to judge
        return None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return None
    return state
