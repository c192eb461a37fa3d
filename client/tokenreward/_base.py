"""Everything the two clients share that does no I/O.

Building request bodies, splitting big submissions into chunks, choosing endpoints, deciding
whether and when to retry, and turning responses into results or typed errors all live here;
:class:`~tokenreward.RewardClient` and :class:`~tokenreward.AsyncRewardClient` only send bytes
and sleep. That keeps the twins identical in behaviour and makes the policy testable without
a network.
"""

from __future__ import annotations

import contextlib
import math
import random
import threading
import time
import uuid
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from tokenreward import binary
from tokenreward._errors import (
    BY_STATUS,
    BY_TYPE,
    APIError,
    BadResponseError,
    ConnectionFailedError,
    DeadlineExceededError,
    InternalServerError,
    OverloadedError,
    RewardClientError,
)
from tokenreward._policy import Endpoint, EndpointPool, RetryPolicy
from tokenreward.protocol import (
    Baseline,
    ErrorResponse,
    RewardItem,
    RewardRequest,
    RewardResponse,
    RewardResult,
)

__all__ = ["Attempts", "BaseRewardClient", "CallCancelled", "ItemLike", "Send", "Sleep"]

ItemLike = RewardItem | Sequence[Any] | Mapping[str, Any]
"""A :class:`RewardItem`, a ``(prompt_ids, response_ids)`` pair, or a mapping of its fields
(``{"messages": [...], "response_ids": ...}`` for a conversation, say)."""

RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
"""Overloaded, bad gateway, not ready, server-side timeout: all transient. A 500 is not: the
same item would fail again. 4xx other than 429 never are."""


@dataclass(frozen=True)
class Chunk:
    """A slice of the caller's items sent as one request, with its encoded body."""

    items: range
    body: bytes
    request_id: str
    ids: tuple[str | None, ...]
    """The id each result must carry: the caller's, or one the client gave the item."""
    lengths: tuple[int | None, ...] = ()
    """Rewards each result must have (the response's token IDs), where the client knows it."""
    own_ids: tuple[bool, ...] = ()
    """Per item, whether its id is the client's own, to be taken off its result again."""
    content_type: str = "application/json"
    """The body's encoding: JSON, or :data:`tokenreward.binary.MEDIA_TYPE`."""


@dataclass(frozen=True)
class Options:
    """The request options of one ``rewards`` call, the same for each of its chunks."""

    beta_c: float
    baseline: Baseline
    return_prefix_scores: bool
    policy_tokenizer: str | None
    step_separator: str | None


@dataclass
class Outcome:
    """What one attempt gave: results, or an error with what to do about it."""

    results: list[RewardResult] | None = None
    revision: str | None = None
    content: bytes | None = None
    """The raw body of a successful GET."""
    error: RewardClientError | None = None
    retryable: bool = False
    endpoint_failed: bool = False
    retry_after: float | None = None


@dataclass
class CallState:
    """Progress of one ``rewards`` call across its chunks."""

    deadline: float
    results: list[RewardResult | None]
    revisions: set[str] = field(default_factory=set)
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set when one chunk has failed for good: its siblings stop at their next step."""


class CallCancelled(Exception):
    """A sibling chunk failed for good: this chunk stops instead of retrying on."""


@dataclass(frozen=True)
class Send:
    """Send the chunk to ``endpoint``; the whole attempt must end within ``timeout`` seconds."""

    endpoint: Endpoint
    timeout: float


@dataclass(frozen=True)
class Sleep:
    """Wait ``seconds`` before the next attempt (stop early if the call is cancelled)."""

    seconds: float


Attempts = Generator[Send | Sleep, Outcome | None, Outcome]
"""The attempt/retry decisions of one chunk: yields what to do, is sent each attempt's
:class:`Outcome`, returns the successful one or raises the final error."""


def to_item(value: ItemLike, index: int) -> RewardItem:
    """Accept the shapes a trainer has at hand; token IDs may be lists, tuples, numpy arrays or
    tensors (anything with ``tolist``)."""
    if isinstance(value, RewardItem):
        return value
    if isinstance(value, Mapping):
        data = dict(value)
    elif isinstance(value, Sequence) and len(value) == 2 and not isinstance(value, str | bytes):
        data = {"prompt_ids": value[0], "response_ids": value[1]}
    else:
        raise TypeError(
            f"item {index}: expected a RewardItem, a (prompt_ids, response_ids) pair or a mapping, "
            f"got {type(value).__name__}"
        )
    for key in ("prompt_ids", "response_ids"):
        ids = data.get(key)
        if ids is not None and not isinstance(ids, list):
            data[key] = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    try:
        return RewardItem.model_validate(data)
    except ValidationError as exc:
        raise TypeError(f"item {index}: {exc.errors(include_url=False)[0]['msg']}") from None


class BaseRewardClient:
    """Configuration and pure logic of both clients."""

    def __init__(
        self,
        base_urls: str | Sequence[str],
        *,
        api_key: str | None = None,
        timeout: float = 600.0,
        request_timeout: float = 120.0,
        max_items_per_request: int = 512,
        max_bytes_per_request: int = 4 * 1024 * 1024,
        max_concurrency: int = 8,
        retry: RetryPolicy | None = None,
        endpoint_backoff_s: float = 1.0,
        seed: int | None = None,
        binary_requests: bool = False,
    ) -> None:
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        self.binary_requests = binary_requests
        """Send token-ID requests in the binary encoding (the server must read it: 0.1 servers
        list it in ``/v1/model``'s ``encodings``); text items and step_separator stay JSON."""
        self.pool = EndpointPool(urls, backoff_s=endpoint_backoff_s)
        self.api_key = api_key
        self.timeout = timeout
        self.request_timeout = request_timeout
        self.max_items_per_request = max_items_per_request
        self.max_bytes_per_request = max_bytes_per_request
        self.max_concurrency = max_concurrency
        self.retry = retry or RetryPolicy()
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()

    # -- building requests -------------------------------------------------------------------

    def headers(self, request_id: str, content_type: str = "application/json") -> dict[str, str]:
        # Answers in the binary encoding where the server writes it (it is smaller and
        # quicker to read); a server that does not answers JSON, which is read as before.
        headers = {
            "Content-Type": content_type,
            "Accept": f"{binary.MEDIA_TYPE}, application/json;q=0.5",
            "X-Request-ID": request_id,
        }
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def plan(
        self,
        items: Sequence[ItemLike],
        *,
        beta_c: float,
        baseline: Baseline,
        return_prefix_scores: bool,
        policy_tokenizer: str | None = None,
        step_separator: str | None = None,
    ) -> list[Chunk]:
        """Split ``items`` into requests under the item and byte caps, in order."""
        if not items:
            return []
        options = Options(beta_c, baseline, return_prefix_scores, policy_tokenizer, step_separator)
        normalised = [to_item(value, index) for index, value in enumerate(items)]
        chunks: list[Chunk] = []
        start = 0
        size = 0
        for index, item in enumerate(normalised):
            # Upper bound of the item's JSON size: up to 7 characters and a comma per token id.
            tokens = len(item.prompt_ids or ()) + len(item.response_ids or ())
            text = len(item.prompt or "") + len(item.response or "")
            text += sum(len(m.content) + 32 for m in item.messages or ())
            estimate = 64 + len(item.id or "") + 8 * tokens + 6 * text  # JSON escapes included
            full = index - start >= self.max_items_per_request
            if index > start and (full or size + estimate > self.max_bytes_per_request):
                chunks.append(self._chunk(normalised, range(start, index), options))
                start, size = index, 0
            size += estimate
        chunks.append(self._chunk(normalised, range(start, len(normalised)), options))
        return chunks

    def _chunk(self, items: list[RewardItem], span: range, options: Options) -> Chunk:
        # Every item goes out with an id (the caller's, or its position here), so that results
        # swapped or dropped by a faulty replica or proxy are caught, not returned as data.
        sent = [
            item if item.id is not None else item.model_copy(update={"id": f"#{i}"})
            for i, item in zip(span, items[span.start : span.stop], strict=True)
        ]
        request = RewardRequest(
            items=sent,
            beta_c=options.beta_c,
            baseline=options.baseline,
            return_prefix_scores=options.return_prefix_scores,
            policy_tokenizer=options.policy_tokenizer,
            step_separator=options.step_separator,
        )
        body, content_type = b"", "application/json"
        if self.binary_requests and options.step_separator is None:
            with contextlib.suppress(ValueError):  # text items: JSON
                body, content_type = binary.encode_request(request), binary.MEDIA_TYPE
        return Chunk(
            items=span,
            body=body or request.model_dump_json(exclude_none=True).encode(),
            content_type=content_type,
            request_id=uuid.uuid4().hex,
            ids=tuple(item.id for item in sent),
            lengths=tuple(
                len(item.response_ids) if item.response_ids is not None else None for item in sent
            ),
            own_ids=tuple(items[i].id is None for i in span),
        )

    def new_call(self, count: int, timeout: float | None) -> CallState:
        return CallState(
            deadline=time.monotonic() + (self.timeout if timeout is None else timeout),
            results=[None] * count,
        )

    # -- reading responses -------------------------------------------------------------------

    def outcome(
        self,
        method: str,
        status: int,
        content: bytes,
        headers: Mapping[str, str],
        chunk: Chunk,
        url: str,
    ) -> Outcome:
        """Turn one HTTP answer into results or a classified error."""
        if status == 200 and method == "GET":
            return Outcome(content=content)
        if status == 200:
            try:
                if binary.is_binary(headers.get("content-type")):
                    parsed = binary.decode_response(content)
                else:
                    parsed = RewardResponse.model_validate_json(content)
            except (ValidationError, binary.BinaryFormatError) as exc:
                return _malformed(f"{url} answered 200 with an invalid body: {exc}", chunk)
            problem = _check_results(parsed.results, chunk)
            if problem is not None:
                return _malformed(f"{url} {problem}", chunk)
            results = list(parsed.results)
            if any(chunk.own_ids):
                results = [
                    r.model_copy(update={"id": None}) if own else r
                    for r, own in zip(results, chunk.own_ids, strict=True)
                ]
            return Outcome(results=results, revision=parsed.model.revision)
        error = self.api_error(status, content, headers, chunk, url)
        retryable = status in RETRYABLE_STATUSES
        return Outcome(
            error=error,
            retryable=retryable,
            endpoint_failed=status >= 500,
            retry_after=error.retry_after if isinstance(error, OverloadedError) else None,
        )

    def api_error(
        self, status: int, content: bytes, headers: Mapping[str, str], chunk: Chunk, url: str
    ) -> APIError:
        """Map the wire error shape first, the status second."""
        item: int | None = None
        try:
            body = ErrorResponse.model_validate_json(content).error
            cls = BY_TYPE[body.type]
            message = body.message
            if body.item is not None:
                item = chunk.items.start + body.item
        except ValidationError:
            cls = BY_STATUS.get(status, APIError)
            text = content[:200].decode("utf-8", "replace").strip()
            message = f"HTTP {status}" + (f": {text}" if text else "")
        if cls is APIError and status >= 500:
            cls = InternalServerError
        kwargs: dict[str, Any] = {
            "status": status,
            "item": item,
            "request_id": chunk.request_id,
            "items": chunk.items,
            "endpoint": url,
        }
        if cls is OverloadedError:
            return OverloadedError(message, retry_after=_retry_after(headers), **kwargs)
        return cls(message, **kwargs)

    def transport_outcome(self, exc: Exception, chunk: Chunk, url: str) -> Outcome:
        error = ConnectionFailedError(f"{url}: {type(exc).__name__}: {exc}", items=chunk.items)
        return Outcome(error=error, retryable=True, endpoint_failed=True)

    # -- deciding ----------------------------------------------------------------------------

    def attempt_timeout(self, state: CallState, chunk: Chunk) -> float:
        """The whole attempt's budget: the request timeout, within the call's deadline; with
        several replicas at most half of what is left, so that a replica that never answers
        leaves time to try another."""
        remaining = state.deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceededError("the call's deadline passed", items=chunk.items)
        if len(self.pool.endpoints) > 1:
            remaining = max(remaining / 2, min(remaining, 1.0))
        return min(self.request_timeout, remaining)

    def attempts(self, chunk: Chunk, state: CallState) -> Attempts:
        """The one attempt/retry/cancel logic that both clients drive (sans I/O): each client
        only performs the :class:`Send` and :class:`Sleep` steps it is given, its own way."""
        attempt = 0
        previous: Endpoint | None = None
        while True:
            if state.cancelled.is_set():
                raise CallCancelled("a sibling chunk of this call failed")
            timeout = self.attempt_timeout(state, chunk)
            endpoint = self.pool.acquire(avoid=previous)
            try:
                outcome = yield Send(endpoint, timeout)
            except BaseException:
                self.pool.release(endpoint, failed=False)
                raise
            assert outcome is not None
            self.pool.release(endpoint, failed=outcome.endpoint_failed)
            if outcome.retry_after is not None:
                self.pool.overloaded(endpoint, outcome.retry_after)
            if outcome.error is None:
                return outcome
            delay = self.next_delay(outcome, attempt, state, chunk)
            if outcome.retry_after is not None and self.pool.idle_other(endpoint):
                delay = 0.0  # another replica is not overloaded: try it now, not in Retry-After
            if delay > 0:
                yield Sleep(delay)
            attempt += 1
            previous = endpoint

    def next_delay(self, outcome: Outcome, attempt: int, state: CallState, chunk: Chunk) -> float:
        """Seconds to sleep before retrying, or raise the outcome's error when it is final."""
        assert outcome.error is not None
        if not outcome.retryable or attempt + 1 >= self.retry.max_attempts:
            raise outcome.error
        with self._rng_lock:
            delay = self.retry.delay(attempt, outcome.retry_after, self._rng)
        if time.monotonic() + delay >= state.deadline:
            raise DeadlineExceededError(
                f"the call's deadline passed while retrying after: {outcome.error}",
                items=chunk.items,
            ) from outcome.error
        return delay

    def accept(self, state: CallState, chunk: Chunk, outcome: Outcome) -> None:
        assert outcome.results is not None
        assert outcome.revision is not None
        state.revisions.add(outcome.revision)
        if len(state.revisions) > 1:
            raise BadResponseError(
                f"the replicas serve different model revisions ({sorted(state.revisions)}); "
                "rewards from different models cannot be mixed in one call",
                items=chunk.items,
            )
        for offset, result in enumerate(outcome.results):
            slot = chunk.items.start + offset
            if state.results[slot] is not None:
                raise BadResponseError(f"item {slot} got two results", items=chunk.items)
            state.results[slot] = result

    @staticmethod
    def finish(state: CallState) -> list[RewardResult]:
        missing = [i for i, r in enumerate(state.results) if r is None]
        if missing:
            raise BadResponseError(
                f"{len(missing)} items got no result", items=range(missing[0], missing[-1] + 1)
            )
        return [r for r in state.results if r is not None]


def _malformed(message: str, chunk: Chunk) -> Outcome:
    """A 200 that cannot be right: a replica or proxy fault, never data. The replica is set
    aside and the chunk retried elsewhere."""
    return Outcome(
        error=BadResponseError(message, items=chunk.items), retryable=True, endpoint_failed=True
    )


def _check_results(results: Sequence[RewardResult], chunk: Chunk) -> str | None:
    """What is wrong with a 200's results for this chunk, or None."""
    if len(results) != len(chunk.items):
        return f"returned {len(results)} results for {len(chunk.items)} items"
    for offset, result in enumerate(results):
        sent = chunk.ids[offset]
        if result.id != sent:
            return f"returned id {result.id!r} where {sent!r} was sent"
        expected = chunk.lengths[offset] if chunk.lengths else None
        if expected is not None and len(result.token_rewards) != expected:
            return (
                f"returned {len(result.token_rewards)} token rewards for item {sent!r} of "
                f"{expected} response tokens"
            )
        # One C-speed sum per result: NaN and infinities propagate into it.
        total = sum(result.token_rewards, result.score + (result.prompt_score or 0.0))
        if not math.isfinite(total):
            return f"returned a non-finite reward or score for item {sent!r}"
    return None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to our own back-off
