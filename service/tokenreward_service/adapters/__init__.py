"""Adapters: per-position scores for reward models whose head is not a linear layer.

Most reward models are a decoder plus a linear head on the last hidden state, and the server
reads that head at every position itself. Some are not: a gated mixture of objectives, an RM
read at a dedicated reward token, a head that pools. For those, ``--adapter`` names a function
that computes the scores::

    def scores(model, input_ids, attention_mask) -> torch.Tensor:
        '''[batch, seq] scores: position t's score is the RM's score of tokens[0..t].'''

- ``model`` is the model as loaded from the folder: the class its ``config.json`` names (its
  ``auto_map`` class with ``--trust-remote-code``), in the server's dtype, on its device, in
  eval mode.
- ``input_ids`` and ``attention_mask`` are ``[batch, seq]`` long tensors on that device; rows
  are right-padded (mask 0 after each row's tokens). Scores at padded positions are ignored.
- The return value is ``[batch, seq]``, any float dtype (compute the head in float32: token
  rewards are differences of scores, and bf16 scores make them noise).
- It runs under ``torch.inference_mode()`` on the inference thread, one batch at a time.
- It must be causal: position t's score may depend on tokens[0..t] only. This is checked at
  load time, as the model's causality is.

``--adapter`` takes ``package.module:function``, ``path/to/file.py:function``, or a module or
file alone, whose function ``scores`` is then used. Prompts shared by several items are not
computed once for adapters (that needs the model's key/value cache, which an adapter hides).
The example shipped is :mod:`tokenreward_service.adapters.gated`, for a gated
multi-objective head.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from tokenreward_service.errors import ModelLoadError

__all__ = ["DEFAULT_FUNCTION", "Adapter", "ScoreFunction", "load_adapter"]

DEFAULT_FUNCTION = "scores"
"""The function used when ``--adapter`` names a module or file without ``:function``."""


class ScoreFunction(Protocol):
    """``(model, input_ids, attention_mask) -> [batch, seq]`` per-position scores."""

    def __call__(
        self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class Adapter:
    """A loaded adapter: the entry point as given, and its function."""

    name: str
    function: ScoreFunction


def load_adapter(entry_point: str) -> Adapter:
    """Import the adapter ``entry_point`` names; :class:`ModelLoadError` if it cannot be used."""
    target, attribute = _split(entry_point)
    module = _import_file(Path(target)) if _is_path(target) else _import_module(target)
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ModelLoadError(
            f"adapter {entry_point!r}: {target} has no function {attribute!r} "
            "(scores(model, input_ids, attention_mask) -> [batch, seq] tensor)"
        )
    return Adapter(name=entry_point, function=function)


def _split(entry_point: str) -> tuple[str, str]:
    target, colon, attribute = entry_point.rpartition(":")
    if colon and target and attribute.isidentifier():
        return target, attribute
    return entry_point, DEFAULT_FUNCTION


def _is_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _import_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ModelLoadError(f"adapter module {name!r} cannot be imported: {exc}") from exc


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise ModelLoadError(f"adapter file {path} does not exist")
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(f"tokenreward_adapter_{digest}", path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"adapter file {path} is not a Python module")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ModelLoadError(f"adapter file {path} failed to import: {exc}") from exc
    return module
