"""Learner-side helpers: dense reward tensors and the per-token PPO reward (Eq. 8).

torch is used when it is installed (or asked for), numpy otherwise; neither is imported until
a function here is called.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from tokenreward.protocol import RewardResult

__all__ = ["dense_rewards", "ppo_token_rewards"]

Backend = Literal["auto", "torch", "numpy"]


def _backend(backend: Backend) -> Any:
    if backend in ("auto", "torch"):
        try:
            import torch

            return torch
        except ImportError:
            if backend == "torch":
                raise
    try:
        import numpy
    except ImportError as exc:
        raise ImportError("dense_rewards needs torch or numpy; install one of them") from exc
    return numpy


def dense_rewards(
    results: Sequence[RewardResult],
    *,
    pad_to: int | None = None,
    backend: Backend = "auto",
) -> tuple[Any, Any]:
    """``(rewards, mask)``: ``[B, T]`` float32 rewards right-padded with 0 and a bool mask that
    is True on real response tokens, ``T`` the longest response (or ``pad_to``).

    The rows line up with a learner's right-padded response tensors, so ``rewards * mask`` or
    ``rewards[mask]`` need no further bookkeeping.
    """
    lib = _backend(backend)
    width = max((len(r.token_rewards) for r in results), default=0)
    if pad_to is not None:
        if pad_to < width:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest response ({width})")
        width = pad_to
    rows = [list(r.token_rewards) + [0.0] * (width - len(r.token_rewards)) for r in results]
    masks = [
        [True] * len(r.token_rewards) + [False] * (width - len(r.token_rewards)) for r in results
    ]
    if lib.__name__ == "torch":
        return (
            lib.tensor(rows, dtype=lib.float32).reshape(len(results), width),
            lib.tensor(masks, dtype=lib.bool).reshape(len(results), width),
        )
    return (
        lib.asarray(rows, dtype=lib.float32).reshape(len(results), width),
        lib.asarray(masks, dtype=bool).reshape(len(results), width),
    )


def ppo_token_rewards(
    token_rewards: Any, logprobs_old: Any, logprobs_ref: Any, mask: Any, *, beta: float
) -> Any:
    """Eq. 8 of the paper: ``r_t = r̂_t − β · (log π_old(y_t) − log π_ref(y_t))``, zero on padding.

    Works on torch tensors or numpy arrays of the same ``[B, T]`` shape (the log-probs of the
    sampled tokens under the rollout policy and the reference policy).
    """
    if beta < 0:
        raise ValueError("beta must be non-negative")
    shapes = {tuple(x.shape) for x in (token_rewards, logprobs_old, logprobs_ref, mask)}
    if len(shapes) != 1:
        raise ValueError(f"all inputs must have the same shape, got {sorted(shapes)}")
    return (token_rewards - beta * (logprobs_old - logprobs_ref)) * mask
