"""vLLM generation outputs to reward items, and results back to samples.

Written against vLLM's documented output objects: a ``RequestOutput`` has ``request_id``,
``prompt_token_ids`` and ``outputs``, a list of ``CompletionOutput`` (one per sample when
``n > 1``), each with ``index`` and ``token_ids``. Only those fields are read, so any object of
that shape works; vLLM itself is never imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from tokenreward.protocol import RewardItem, RewardResult

__all__ = ["CompletionOutputLike", "RequestOutputLike", "items_from_vllm", "rewards_by_request"]


class CompletionOutputLike(Protocol):
    @property
    def index(self) -> int: ...
    @property
    def token_ids(self) -> Sequence[int]: ...


class RequestOutputLike(Protocol):
    @property
    def request_id(self) -> str: ...
    @property
    def prompt_token_ids(self) -> Sequence[int] | None: ...
    @property
    def outputs(self) -> Sequence[CompletionOutputLike]: ...


def items_from_vllm(outputs: Sequence[RequestOutputLike]) -> list[RewardItem]:
    """One item per sample, request by request, samples in ``index`` order; ids are
    ``"<request_id>/<index>"`` so a result can be traced to its sample."""
    items = []
    for request in outputs:
        if request.prompt_token_ids is None:
            raise ValueError(f"request {request.request_id!r} has no prompt_token_ids")
        prompt = list(request.prompt_token_ids)
        for sample in sorted(request.outputs, key=lambda o: o.index):
            items.append(
                RewardItem(
                    id=f"{request.request_id}/{sample.index}",
                    prompt_ids=prompt,
                    response_ids=list(sample.token_ids),
                )
            )
    return items


def rewards_by_request(
    outputs: Sequence[RequestOutputLike], results: Sequence[RewardResult]
) -> list[list[RewardResult]]:
    """Regroup the results of :func:`items_from_vllm` items as ``[request][sample index]``.

    Checks every id, so results that do not belong to these outputs raise instead of being
    silently attached to the wrong sample.
    """
    grouped: list[list[RewardResult]] = []
    position = 0
    for request in outputs:
        samples = []
        for sample in sorted(request.outputs, key=lambda o: o.index):
            expected = f"{request.request_id}/{sample.index}"
            if position >= len(results) or results[position].id != expected:
                found = results[position].id if position < len(results) else "nothing"
                raise ValueError(f"result {position} is {found!r}, expected {expected!r}")
            samples.append(results[position])
            position += 1
        grouped.append(samples)
    if position != len(results):
        raise ValueError(f"{len(results) - position} results do not belong to these outputs")
    return grouped
