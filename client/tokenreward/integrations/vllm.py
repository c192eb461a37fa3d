"""vLLM generation outputs to reward items, and results back to samples.

Written against vLLM's documented output objects: a ``RequestOutput`` has ``request_id``,
``prompt_token_ids`` and ``outputs``, a list of ``CompletionOutput`` (one per sample when
``n > 1``), each with ``index`` and ``token_ids``. Only those fields are read, so any object of
that shape works; vLLM itself is never imported.

A rollout worker whose policy and RM tokenize differently sends the conversations it generated
from (``messages=``) with the generated token IDs, and names the policy tokenizer in the call
(``client.rewards(items, policy_tokenizer="policy")``): the server renders the conversation
with the RM's chat template and returns one reward per generated token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

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


def items_from_vllm(
    outputs: Sequence[RequestOutputLike],
    *,
    messages: Sequence[Sequence[Mapping[str, Any]]] | None = None,
) -> list[RewardItem]:
    """One item per sample, request by request, samples in ``index`` order; ids are
    ``"<request_id>/<index>"`` so a result can be traced to its sample.

    ``messages``, one conversation per request output (what ``llm.chat`` was given), replaces
    the prompt token IDs: the RM then reads the conversation in its own chat template.
    """
    if messages is not None and len(messages) != len(outputs):
        raise ValueError(f"{len(messages)} conversations for {len(outputs)} request outputs")
    items = []
    for position, request in enumerate(outputs):
        prompt: dict[str, Any]
        if messages is not None:
            prompt = {"messages": [dict(m) for m in messages[position]]}
        elif request.prompt_token_ids is None:
            raise ValueError(f"request {request.request_id!r} has no prompt_token_ids")
        else:
            prompt = {"prompt_ids": list(request.prompt_token_ids)}
        for sample in sorted(request.outputs, key=lambda o: o.index):
            items.append(
                RewardItem.model_validate(
                    {
                        "id": f"{request.request_id}/{sample.index}",
                        **prompt,
                        "response_ids": list(sample.token_ids),
                    }
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
