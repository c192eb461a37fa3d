"""Which requests the event loop prepares itself (tokenreward_service.serving.inline)."""

from __future__ import annotations

from typing import Any

import pytest

from tokenreward.protocol import RewardRequest
from tokenreward_service.serving import INLINE_BODY_BYTES, INLINE_TOKENS, inline

IDS = {"prompt_ids": [1, 2, 3], "response_ids": [4, 5]}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"items": [IDS] * 4}, True),
        # Exactly at the bound, and one token past it.
        ({"items": [{"prompt_ids": [1] * (INLINE_TOKENS - 1), "response_ids": [2]}]}, True),
        ({"items": [{"prompt_ids": [1] * INLINE_TOKENS, "response_ids": [2]}]}, False),
        # A tokenizer runs: text, chat messages, policy tokens, step separators.
        ({"items": [IDS, {"prompt": "hi", "response": "there"}]}, False),
        (
            {"items": [{"messages": [{"role": "user", "content": "hi"}], "response_ids": [4]}]},
            False,
        ),
        ({"items": [IDS], "policy_tokenizer": "llama3"}, False),
        ({"items": [IDS], "step_separator": "\n"}, False),
    ],
)
def test_only_small_requests_of_token_ids_are_prepared_on_the_loop(
    body: dict[str, Any], expected: bool
) -> None:
    assert inline(RewardRequest.model_validate(body)) is expected


def test_the_bounds_are_the_readmes() -> None:
    """The README: "a body over 256 KiB or a request of more than 65,536 token IDs"."""
    assert (INLINE_BODY_BYTES, INLINE_TOKENS) == (256 * 1024, 65_536)
