"""OpenRLHF's remote reward-model protocol, served from the same model and batcher.

OpenRLHF (``--reward.remote_url http://HOST:PORT/get_reward``) POSTs
``{"query": [str], "prompts": [str], "labels": [...]}``: each query is the whole decoded
sequence (the prompt in the policy's chat template, then the response, special tokens kept),
each prompt the text the query starts with. It reads ``rewards`` (the scalar it places on the
last response token), ``scores`` (what it filters and logs) and ``extra_logs`` (per-sample
values it logs as metrics). OpenRLHF's own ``serve_rm`` answers the same keys.

Each query is split at the end of its prompt. With ``?policy_tokenizer=NAME`` (a tokenizer the
server loaded with ``--policy-tokenizer``) both parts are tokenized with the policy's tokenizer,
special tokens parsed as such, and scored as policy token IDs: the chat template's markers and
the end-of-turn token carry no text for the RM, exactly as on ``/v1/rewards``. Without it, both
parts are text items for the RM's own tokenizer, which reads any special-token markers in them
as plain text (as OpenRLHF's own ``serve_rm`` does with the whole query). Scoring uses the
service's defaults (full RED, baseline ``prompt``). ``rewards`` and ``scores`` are the holistic
score ``R(x, y)``; ``extra_logs`` carries ``prompt_score`` ``R(x)`` and ``response_tokens``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from tokenreward.protocol import RewardItem, RewardRequest, RewardResponse
from tokenreward_service.errors import InvalidRequest, TooLarge
from tokenreward_service.tokentext import TokenText

__all__ = ["EMPTY", "RemoteRMRequest", "answer", "parse_remote_rm_request"]


class RemoteRMRequest(BaseModel):
    """The body OpenRLHF sends; fields it may add later are ignored, as its own server does."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    query: list[StrictStr] = Field(description="Prompt + response, decoded as one text.")
    prompts: list[StrictStr] | None = Field(
        default=None, description="The prompt each query starts with."
    )
    labels: list[Any] | None = Field(default=None, description="Accepted and not used.")


def parse_remote_rm_request(
    body: bytes,
    max_items: int,
    policies: Mapping[str, TokenText] | None = None,
    policy_name: str | None = None,
) -> RewardRequest | None:
    """Bytes to the equivalent reward request, or None for an empty one (OpenRLHF sends empty
    lists to some of several URLs); the error names the first offending sample. With
    ``policy_name``, the texts are tokenized by that one of ``policies``."""
    policy = None
    if policy_name is not None:
        policy = (policies or {}).get(policy_name)
        if policy is None:
            known = ", ".join(sorted(policies or {})) or "none are loaded"
            raise InvalidRequest(
                f"policy_tokenizer {policy_name!r} is not loaded ({known}); "
                "start the server with --policy-tokenizer NAME=PATH"
            )
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"body is not valid JSON: {exc}") from None
    try:
        request = RemoteRMRequest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise InvalidRequest(f"{where}: {first['msg']}") from None
    if len(request.query) > max_items:
        raise TooLarge(f"{len(request.query)} queries in one request; the limit is {max_items}")
    if not request.query:
        return None
    if request.prompts is None:
        raise InvalidRequest(
            "'prompts' is missing: each query is split into prompt and response at its prompt"
        )
    if len(request.prompts) != len(request.query):
        raise InvalidRequest(
            f"{len(request.query)} queries but {len(request.prompts)} prompts; one prompt per query"
        )
    if request.labels is not None and len(request.labels) not in (0, len(request.query)):
        raise InvalidRequest(
            f"{len(request.query)} queries but {len(request.labels)} labels; one label per query"
        )
    items = []
    for index, (query, prompt) in enumerate(zip(request.query, request.prompts, strict=True)):
        if not query.startswith(prompt):
            raise InvalidRequest(
                "the query does not start with its prompt, so the response cannot be found",
                item=index,
            )
        if len(query) == len(prompt):
            raise InvalidRequest("the query holds no response after its prompt", item=index)
        response = query[len(prompt) :]
        if policy is None:
            items.append(RewardItem(prompt=prompt, response=response))
            continue
        prompt_ids, response_ids = policy.encode(prompt)[0], policy.encode(response)[0]
        if not response_ids:
            raise InvalidRequest("the response tokenizes to no policy tokens", item=index)
        items.append(RewardItem(prompt_ids=prompt_ids, response_ids=response_ids))
    return RewardRequest(items=items, policy_tokenizer=policy_name)


EMPTY: dict[str, Any] = {"rewards": [], "scores": [], "extra_logs": {}}
"""The reply to empty lists."""


def answer(response: RewardResponse) -> dict[str, Any]:
    """The reply OpenRLHF reads: one value per query in each list."""
    results = response.results
    scores = [r.score for r in results]
    logs = {
        "prompt_score": [r.prompt_score for r in results],
        "response_tokens": [len(r.token_rewards) for r in results],
    }
    return {"rewards": scores, "scores": scores, "extra_logs": logs}
