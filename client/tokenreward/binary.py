"""A compact binary encoding of ``POST /v1/rewards``: token IDs and rewards as little-endian
arrays, everything else as a small JSON header. Negotiated per request: a body sent with
``Content-Type: application/vnd.tokenreward.v1+binary`` is read in this encoding, and an
answer is written in it when ``Accept`` names that type (JSON stays the default both ways).

Request::

    b"TKR1"  u32 header length  header (UTF-8 JSON: the request's options, and "ids": one
                                 string or null per item, or absent)
    u32 items  i32[items] prompt lengths  i32[items] response lengths
    i32[...]   each item's prompt IDs then its response IDs, item after item

Response::

    b"TKR1"  u32 header length  header (UTF-8 JSON: "model", "ids", "prefix_scores" (whether
                                 they follow), and per-item text fields when any are set)
    u32 items  i32[items] rewards per item  f64[items] score  f64[items] prompt_score (NaN: none)
    f64[...] token rewards, item after item  [f64[...] prefix scores, the same way]

Only token-ID items travel this way (text and chat messages need JSON). Decoding checks every
length against the body, so a truncated or padded body is an error, never a shifted result.
Standard library only (``array``, ``struct``, ``json``): the client keeps its light install.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from array import array
from collections.abc import Callable
from typing import Any

from tokenreward.protocol import ModelRef, RewardItem, RewardRequest, RewardResponse, RewardResult

__all__ = [
    "MEDIA_TYPE",
    "BinaryFormatError",
    "TooManyItemsError",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "is_binary",
]

MEDIA_TYPE = "application/vnd.tokenreward.v1+binary"
MAGIC = b"TKR1"
_OPTIONS = ("beta_c", "baseline", "return_prefix_scores", "policy_tokenizer")
_TEXT_FIELDS = ("response_tokens", "response_offsets", "step_rewards", "step_ends")
_SWAP = sys.byteorder != "little"
_STAND_IN = {"prompt_ids": [], "response_ids": [0]}


class BinaryFormatError(ValueError):
    """The body is not a well-formed message of this encoding."""


class TooManyItemsError(BinaryFormatError):
    """The request holds more items than the reader accepts."""


def is_binary(content_type: str | None) -> bool:
    """Whether a ``Content-Type`` (or an entry of ``Accept`` not weighted ``q=0``) names this
    encoding."""
    if not content_type:
        return False
    for part in content_type.split(","):
        kind, *params = (piece.strip().lower() for piece in part.split(";"))
        if kind == MEDIA_TYPE and not any(p.replace(" ", "") in ("q=0", "q=0.0") for p in params):
            return True
    return False


def _pack(kind: str, values: Any) -> bytes:
    data = values if isinstance(values, array) else array(kind, values)
    if _SWAP:
        data = array(kind, data)
        data.byteswap()
    return data.tobytes()


class _Reader:
    def __init__(self, body: bytes) -> None:
        self.body = memoryview(body)
        self.at = 0

    def take(self, size: int, what: str) -> memoryview:
        if size < 0 or self.at + size > len(self.body):
            raise BinaryFormatError(f"the body ends inside {what}")
        piece = self.body[self.at : self.at + size]
        self.at += size
        return piece

    def u32(self, what: str) -> int:
        value: int = struct.unpack("<I", self.take(4, what))[0]
        return value

    def array(self, kind: str, count: int, what: str) -> array[Any]:
        data = array(kind)
        data.frombytes(self.take(count * data.itemsize, what))
        if _SWAP:
            data.byteswap()
        return data

    def header(self) -> dict[str, Any]:
        if bytes(self.take(4, "the magic number")) != MAGIC:
            raise BinaryFormatError(f"the body does not start with {MAGIC!r}")
        size = self.u32("the header length")
        try:
            header = json.loads(bytes(self.take(size, "the header")))
        except ValueError as exc:
            raise BinaryFormatError(f"the header is not JSON: {exc}") from None
        if not isinstance(header, dict):
            raise BinaryFormatError("the header is not a JSON object")
        return header

    def end(self) -> None:
        if self.at != len(self.body):
            raise BinaryFormatError(f"{len(self.body) - self.at} bytes after the last array")


def _frame(header: dict[str, Any], *parts: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack("<I", len(head)), head, *parts])


def encode_request(request: RewardRequest) -> bytes:
    """The request in this encoding; every item must carry token IDs, not text."""
    header: dict[str, Any] = {name: getattr(request, name) for name in _OPTIONS}
    if request.step_separator is not None:
        raise ValueError("step_separator needs the JSON encoding")
    ids = [item.id for item in request.items]
    if any(i is not None for i in ids):
        header["ids"] = ids
    prompts, responses, tokens = array("i"), array("i"), array("i")
    for index, item in enumerate(request.items):
        if item.prompt_ids is None or item.response_ids is None or item.messages is not None:
            raise ValueError(f"item {index} is not token IDs: text needs the JSON encoding")
        prompts.append(len(item.prompt_ids))
        responses.append(len(item.response_ids))
        tokens.extend(item.prompt_ids)
        tokens.extend(item.response_ids)
    count = struct.pack("<I", len(request.items))
    return _frame(header, count, _pack("i", prompts), _pack("i", responses), _pack("i", tokens))


def decode_request(
    body: bytes,
    max_items: int | None = None,
    admit: Callable[[int], None] | None = None,
) -> RewardRequest:
    """A request from this encoding, checked as the JSON one is (options, ids, lengths).

    ``max_items`` is checked before the arrays are read (:class:`TooManyItemsError`), and
    ``admit`` is shown the token count before the items are built, and may refuse it. Raises
    :class:`BinaryFormatError` for a malformed body and pydantic's ``ValidationError`` for
    invalid options or items.
    """
    reader = _Reader(body)
    header = reader.header()
    unknown = sorted(set(header) - {*_OPTIONS, "ids"})
    if unknown:
        raise BinaryFormatError(f"unknown header fields: {', '.join(unknown)}")
    count = reader.u32("the item count")
    if max_items is not None and count > max_items:
        raise TooManyItemsError(f"{count} items in one request; the limit is {max_items}")
    prompts = reader.array("i", count, "the prompt lengths")
    responses = reader.array("i", count, "the response lengths")
    if any(n < 0 for n in prompts) or any(n < 1 for n in responses):
        raise BinaryFormatError("prompt lengths must be >= 0 and response lengths >= 1")
    total = sum(prompts) + sum(responses)
    tokens = reader.array("i", total, "the token IDs").tolist()
    reader.end()
    if admit is not None:
        admit(total)
    ids = header.get("ids")
    if ids is not None and (not isinstance(ids, list) or len(ids) != count):
        raise BinaryFormatError(f"'ids' must hold one entry per item ({count})")
    if ids is not None:
        for index, value in enumerate(ids):
            if value is not None and (not isinstance(value, str) or len(value) > 256):
                raise BinaryFormatError(f"item {index}'s id must be a string of at most 256")
    # The options are validated as in JSON, on a stand-in item; the items are built without
    # validation, having been checked here: integer IDs (int32 by construction), a response
    # of at least one token, an id of at most 256 characters, and token IDs only.
    options = {name: header[name] for name in _OPTIONS if name in header}
    checked = RewardRequest.model_validate({"items": [_STAND_IN], **options})
    items, at = [], 0
    for index in range(count):
        p, r = prompts[index], responses[index]
        items.append(
            RewardItem.model_construct(
                id=None if ids is None else ids[index],
                prompt_ids=tokens[at : at + p],
                response_ids=tokens[at + p : at + p + r],
            )
        )
        at += p + r
    return checked.model_copy(update={"items": items})


def encode_response(response: RewardResponse) -> bytes:
    """The response in this encoding."""
    results = response.results
    with_prefix = bool(results) and all(r.prefix_scores is not None for r in results)
    header: dict[str, Any] = {
        "model": response.model.model_dump(mode="json"),
        "ids": [r.id for r in results],
        "prefix_scores": with_prefix,
    }
    for name in _TEXT_FIELDS:
        values = [getattr(r, name) for r in results]
        if any(v is not None for v in values):
            header[name] = values
    rewards, prefixes = array("d"), array("d")
    for result in results:
        rewards.extend(result.token_rewards)
        if with_prefix:
            assert result.prefix_scores is not None
            prefixes.extend(result.prefix_scores)
    prompt_scores = [math.nan if r.prompt_score is None else r.prompt_score for r in results]
    parts = [
        struct.pack("<I", len(results)),
        _pack("i", [len(r.token_rewards) for r in results]),
        _pack("d", [r.score for r in results]),
        _pack("d", prompt_scores),
        _pack("d", rewards),
    ]
    if with_prefix:
        parts.append(_pack("d", prefixes))
    return _frame(header, *parts)


def decode_response(body: bytes) -> RewardResponse:
    """A response from this encoding (the same models as the JSON one)."""
    reader = _Reader(body)
    header = reader.header()
    count = reader.u32("the item count")
    counts = reader.array("i", count, "the reward counts")
    if any(n < 0 for n in counts):
        raise BinaryFormatError("reward counts must be >= 0")
    scores = reader.array("d", count, "the scores")
    prompt_scores = reader.array("d", count, "the prompt scores")
    total = sum(counts)
    rewards = reader.array("d", total, "the token rewards").tolist()
    prefixes = (
        reader.array("d", total, "the prefix scores").tolist()
        if header.get("prefix_scores")
        else None
    )
    reader.end()
    ids = header.get("ids") or [None] * count
    text = {name: header.get(name) or [None] * count for name in _TEXT_FIELDS}
    text_fields = [name for name in _TEXT_FIELDS if name != "response_offsets"]
    if len(ids) != count or any(len(values) != count for values in text.values()):
        raise BinaryFormatError(f"header lists must hold one entry per item ({count})")
    results, at = [], 0
    for index in range(count):
        n = counts[index]
        prompt = prompt_scores[index]
        # Floats and ints by construction: built without validation (the client checks
        # every result's id, length and finiteness itself).
        results.append(
            RewardResult.model_construct(
                id=ids[index],
                token_rewards=rewards[at : at + n],
                score=scores[index],
                prompt_score=None if math.isnan(prompt) else prompt,
                prefix_scores=None if prefixes is None else prefixes[at : at + n],
                **{name: text[name][index] for name in text_fields},
                response_offsets=_spans(text["response_offsets"][index]),
            )
        )
        at += n
    return RewardResponse(model=ModelRef.model_validate(header.get("model")), results=results)


def _spans(value: Any) -> list[tuple[int, int]] | None:
    """Character spans as the model holds them: pairs (JSON writes them as lists)."""
    return None if value is None else [(int(a), int(b)) for a, b in value]
