"""The binary encoding: what goes in comes out, and a malformed body is an error, never a
shifted result."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tokenreward import binary
from tokenreward.protocol import (
    ModelRef,
    RewardItem,
    RewardRequest,
    RewardResponse,
    RewardResult,
)

IDS = st.lists(st.integers(0, 2**31 - 1), max_size=20)

items = st.builds(
    RewardItem,
    prompt_ids=IDS,
    response_ids=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=20),
    id=st.one_of(st.none(), st.text(max_size=10)),
)
requests = st.builds(
    RewardRequest,
    items=st.lists(items, min_size=1, max_size=8),
    beta_c=st.floats(0, 1),
    baseline=st.sampled_from(["prompt", "zero"]),
    return_prefix_scores=st.booleans(),
    policy_tokenizer=st.one_of(st.none(), st.just("policy")),
)


@settings(max_examples=200, deadline=None)
@given(requests)
def test_a_request_round_trips(request: RewardRequest) -> None:
    assert binary.decode_request(binary.encode_request(request)) == request


def _result(n: int, index: int, prefix: bool, prompt: bool) -> RewardResult:
    rewards = [((index + 1) * 0.1 + t) / 3.0 for t in range(n)]
    return RewardResult(
        id=f"r{index}",
        token_rewards=rewards,
        score=math.pi * index,
        prompt_score=(-1.0 / 3.0) if prompt else None,
        prefix_scores=[r * 7.0 for r in rewards] if prefix else None,
    )


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(0, 30), min_size=0, max_size=8),
    st.booleans(),
    st.booleans(),
)
def test_a_response_round_trips_bit_for_bit(counts: list[int], prefix: bool, prompt: bool) -> None:
    response = RewardResponse(
        model=ModelRef(id="m", revision="sha256:x"),
        results=[_result(n, i, prefix, prompt) for i, n in enumerate(counts)],
    )
    assert binary.decode_response(binary.encode_response(response)) == response


def test_text_fields_travel_in_the_header() -> None:
    result = RewardResult(
        id=None,
        token_rewards=[0.5, -0.25],
        score=1.0,
        prompt_score=0.75,
        response_tokens=["a", "b"],
        response_offsets=[(0, 1), (1, 2)],
    )
    response = RewardResponse(model=ModelRef(id="m", revision="r"), results=[result])
    assert binary.decode_response(binary.encode_response(response)) == response


def test_text_items_and_steps_need_json() -> None:
    with pytest.raises(ValueError, match="item 0 is not token IDs"):
        binary.encode_request(RewardRequest(items=[RewardItem(prompt="a", response="b")]))
    request = RewardRequest(items=[RewardItem(prompt_ids=[1], response_ids=[2])])
    with pytest.raises(ValueError, match="step_separator"):
        binary.encode_request(request.model_copy(update={"step_separator": "\n"}))


def _request_body() -> bytes:
    items = [RewardItem(prompt_ids=[1, 2, 3], response_ids=[4, 5]) for _ in range(3)]
    return binary.encode_request(RewardRequest(items=items))


@pytest.mark.parametrize("cut", [1, 4, 8, 20, -1, -4, -9])
def test_a_truncated_request_is_refused(cut: int) -> None:
    body = _request_body()
    with pytest.raises(binary.BinaryFormatError):
        binary.decode_request(body[:cut])


def test_extra_bytes_wrong_magic_and_bad_header_are_refused() -> None:
    body = _request_body()
    with pytest.raises(binary.BinaryFormatError, match="bytes after the last array"):
        binary.decode_request(body + b"\0\0\0\0")
    with pytest.raises(binary.BinaryFormatError, match="does not start with"):
        binary.decode_request(b"JSON" + body[4:])
    head = b'{"beta_c": 1, "colour": 2}'
    with pytest.raises(binary.BinaryFormatError, match="unknown header fields: colour"):
        binary.decode_request(b"TKR1" + struct.pack("<I", len(head)) + head)


def test_lengths_are_checked_against_the_body_and_the_limits() -> None:
    head = b"{}"
    frame = b"TKR1" + struct.pack("<I", len(head)) + head
    # one item claiming a 1000-token prompt, with 3 IDs in the body
    body = frame + struct.pack("<I", 1) + struct.pack("<ii", 1000, 2) + struct.pack("<iii", 1, 2, 3)
    with pytest.raises(binary.BinaryFormatError, match="ends inside the token IDs"):
        binary.decode_request(body)
    empty = frame + struct.pack("<I", 1) + struct.pack("<ii", 1, 0) + struct.pack("<i", 1)
    with pytest.raises(binary.BinaryFormatError, match="response lengths >= 1"):
        binary.decode_request(empty)
    with pytest.raises(binary.TooManyItemsError, match="3 items in one request; the limit is 2"):
        binary.decode_request(_request_body(), max_items=2)
    seen: list[int] = []
    binary.decode_request(_request_body(), admit=seen.append)
    assert seen == [15]


def test_invalid_options_fail_validation() -> None:
    head = b'{"beta_c": 2.0}'
    body = (
        b"TKR1"
        + struct.pack("<I", len(head))
        + head
        + struct.pack("<I", 1)
        + struct.pack("<ii", 1, 1)
        + struct.pack("<ii", 7, 8)
    )
    with pytest.raises(ValidationError):
        binary.decode_request(body)


def test_media_type_negotiation() -> None:
    assert binary.is_binary(binary.MEDIA_TYPE)
    assert binary.is_binary(f"application/json, {binary.MEDIA_TYPE};q=0.9")
    assert not binary.is_binary("application/json")
    assert not binary.is_binary(f"application/json, {binary.MEDIA_TYPE}; q=0")
    assert not binary.is_binary(None)
