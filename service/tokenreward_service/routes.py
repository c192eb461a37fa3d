"""The HTTP edge: routes, authentication, body limits, and the one error shape.

Only this module and :mod:`tokenreward_service.app` know FastAPI. Domain errors raised below
become ``{"error": {"type", "message", "item"}}`` through :data:`tokenreward.protocol.ERROR_STATUS`.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenreward import binary
from tokenreward.protocol import (
    ERROR_STATUS,
    ErrorBody,
    ErrorResponse,
    RewardRequest,
    RewardResponse,
)
from tokenreward_service import remote_rm
from tokenreward_service.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    NotReady,
    Overloaded,
    ServiceError,
    TooLarge,
    Unauthorized,
)
from tokenreward_service.metrics import Metrics
from tokenreward_service.serving import INLINE_BODY_BYTES, RewardService

__all__ = [
    "AdmissionMiddleware",
    "AppState",
    "MetricsMiddleware",
    "build_router",
    "install_error_handlers",
]

JSON = "application/json"
ROUTES = ("/v1/rewards", "/get_reward", "/v1/model", "/healthz", "/readyz", "/metrics")
SCORING = ("/v1/rewards", "/get_reward")
"""The routes that queue work for the model."""


class InflightBytes:
    """Request bytes being received or parsed, over all requests, under one bound. The event
    loop is the only writer, so no lock is needed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


MIN_BYTES_PER_TOKEN = 16
"""A request body of N bytes holds at least N / 16 tokens' worth of work in practice (a token
ID is at most 7 characters and a comma; text runs about 4 characters a token): used to refuse
a body while the queue is full before reading and parsing it."""


class AppState:
    """What the routes need; filled by the app's lifespan once the model is loaded."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        api_keys: list[str],
        max_items: int,
        max_bytes: int,
        body_timeout_s: float = 30.0,
        max_inflight_bytes: int = 256 * 1024 * 1024,
        refusal_delay_s: float = 0.0,
        max_queued_tokens: int = 1 << 62,
    ) -> None:
        self.metrics = metrics
        self.api_keys = [key.encode() for key in api_keys]
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.body_timeout_s = body_timeout_s
        self.inflight = InflightBytes(max_inflight_bytes)
        self.refusal_delay_s = refusal_delay_s
        self.service: RewardService | None = None
        self.ready = False
        self.load_error: str | None = None
        """Why the model could not be loaded, if it could not."""
        self.draining = False
        """SIGTERM arrived: /readyz answers 503 while queued and arriving work is still served."""
        self.queue_free: Callable[[], int] = lambda: 1 << 62
        """Tokens the queue can still admit."""
        self.max_queued_tokens = max_queued_tokens
        """Tokens the queue holds at most (more in one request is 413, not 429)."""
        self.retry_after: Callable[[int], int] = lambda tokens: 1
        """Seconds until that many tokens likely fit."""
        self.batcher_alive: Callable[[], bool] = lambda: False
        self.batcher_failed: Callable[[], bool] = lambda: False
        self.batcher_budget: Callable[[], int] = lambda: 0

    def authorised(self, header: bytes) -> bool:
        """Whether an ``Authorization`` header value carries one of the keys (or none are set)."""
        if not self.api_keys:
            return True
        scheme, _, token = header.partition(b" ")
        given = token.strip()
        return scheme.lower() == b"bearer" and any(
            hmac.compare_digest(given, key) for key in self.api_keys
        )

    def queue_refusal(self, tokens: int, what: str, *, close: bool = False) -> Overloaded | None:
        """The 429 for a request of at least ``tokens`` tokens while the queue cannot take it,
        or None when it may go on (it fits, or could never fit: that is the batcher's 413)."""
        free = self.queue_free()
        if tokens <= free or tokens > self.max_queued_tokens:
            return None
        return Overloaded(
            f"queue full (room for {free} tokens; {what} {tokens})",
            retry_after=self.retry_after(tokens),
            close=close,
        )

    def require_service(self) -> RewardService:
        if self.load_error is not None:
            raise NotReady(f"the model could not be loaded: {self.load_error}")
        if self.service is None or not self.ready:
            raise NotReady("the model is not loaded yet, or the server is shutting down")
        return self.service


def error_response(error: ServiceError) -> Response:
    body = ErrorResponse(error=ErrorBody(type=error.type, message=error.message, item=error.item))
    headers: dict[str, str] = {}
    if isinstance(error, Overloaded):
        headers["Retry-After"] = str(error.retry_after)
        if error.close:
            headers["Connection"] = "close"
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return Response(
        orjson.dumps(body.model_dump(mode="json")),
        status_code=ERROR_STATUS[error.type],
        media_type=JSON,
        headers=headers,
    )


def install_error_handlers(app: FastAPI, refusal_delay_s: float = 0.0) -> None:
    """One handler per domain base class, plus Starlette's own 404/405 and the last resort.
    A 429 is answered after ``refusal_delay_s`` (see :class:`AdmissionMiddleware`)."""

    async def on_service_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        if isinstance(exc, Overloaded) and refusal_delay_s > 0:
            await asyncio.sleep(refusal_delay_s)
        return error_response(exc)

    async def on_http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            return error_response(NotFound("no such route"))
        if exc.status_code == 405:
            return error_response(MethodNotAllowed("method not allowed on this route"))
        return error_response(InternalError(str(exc.detail)))

    async def on_unexpected(_: Request, exc: Exception) -> Response:
        return error_response(InternalError(f"unexpected error: {type(exc).__name__}"))

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)


class AdmissionMiddleware:
    """Refuses ``POST /v1/rewards`` and ``/get_reward`` from its head alone while the queue is
    full, before any routing, validation or body reading: under a storm of clients that ignore
    Retry-After a refusal must cost next to nothing, or answering them starves the model.

    Only an authorised request is refused here (others go on to get their 401), and only when
    its ``Content-Length`` says it cannot fit: it holds at least one token per
    :data:`MIN_BYTES_PER_TOKEN` bytes. The connection is closed rather than the unread body
    discarded.
    """

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] not in SCORING
            or not self.state.ready
        ):
            await self.app(scope, receive, send)
            return
        length = None
        authorization = b""
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"authorization":
                authorization = value
        if length is None or not length.isdigit() or not self.state.authorised(authorization):
            await self.app(scope, receive, send)
            return
        least = max(0, int(length) - 256) // MIN_BYTES_PER_TOKEN
        error = self.state.queue_refusal(least, "this body holds at least", close=True)
        if error is None:
            await self.app(scope, receive, send)
            return
        # A pause that costs nothing: a client that retries at once is slowed to a few
        # refusals a second per connection instead of taking the model's CPU.
        if self.state.refusal_delay_s > 0:
            await asyncio.sleep(self.state.refusal_delay_s)
        # Counted by the metrics middleware (requests and errors); its items are not known.
        await error_response(error)(scope, receive, send)


class MetricsMiddleware:
    """Counts every response by route and status and times it; pure ASGI, no body buffering."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_duration.labels(route).observe(time.perf_counter() - started)
            if status >= 400:
                self.metrics.errors.labels(_error_type(status)).inc()


def _error_type(status: int) -> str:
    for error_type, code in ERROR_STATUS.items():
        if code == status:
            return error_type.value
    return "client_closed" if status == 499 else "other"


@dataclass(frozen=True)
class ReceivedBody:
    """A request body, and how much of the in-flight bound it holds until it is parsed."""

    data: bytes
    reserved: int


async def _read_body(request: Request, state: AppState) -> ReceivedBody:
    """The body, within the byte cap, the body deadline and the global in-flight bound.

    A declared ``Content-Length`` is checked and reserved before a byte is read; a chunked
    body reserves as it arrives. The caller gives the reservation back (``state.inflight``)
    once the body is parsed.
    """
    limit = state.max_bytes
    if "transfer-encoding" in request.headers and "content-length" in request.headers:
        # Two framings for one body: the classic request-smuggling shape. Refused outright.
        raise InvalidRequest("a request may not carry both Content-Length and Transfer-Encoding")
    declared = request.headers.get("content-length")
    size = int(declared) if declared is not None and declared.isdigit() else None
    if size is not None and size > limit:
        raise TooLarge(f"request body of {size} bytes exceeds the limit of {limit}")

    def too_many_bytes(*, close: bool) -> Overloaded:
        return Overloaded(
            f"{state.inflight.used} request bytes are being received; try again shortly",
            retry_after=1,
            close=close,
        )

    if size is not None and not state.inflight.take(size):
        raise too_many_bytes(close=True)
    reserved = size or 0
    chunks: list[bytes] = []
    received = 0

    async def receive() -> None:
        nonlocal received, reserved
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise TooLarge(f"request body exceeds the limit of {limit} bytes")
            if received > reserved:
                if not state.inflight.take(received - reserved):
                    raise too_many_bytes(close=False)
                reserved = received
            chunks.append(chunk)

    try:
        await asyncio.wait_for(receive(), state.body_timeout_s)
    except asyncio.TimeoutError:
        state.inflight.give(reserved)
        raise DeadlineExceeded(
            f"the request body did not arrive within {state.body_timeout_s:g} s "
            f"({received} bytes received)"
        ) from None
    except BaseException:
        state.inflight.give(reserved)
        raise
    return ReceivedBody(b"".join(chunks), reserved)


def parse_reward_request(
    body: bytes, max_items: int, admit: Callable[[int], None] | None = None
) -> RewardRequest:
    """Bytes to a validated request; the error names the first offending item.

    ``admit`` is shown the request's token IDs count right after the JSON is decoded, before
    the (costlier) validation, and may refuse it: a request that cannot fit in the queue is
    refused for the price of a JSON decode.
    """
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"body is not valid JSON: {exc}") from None
    items = raw.get("items") if isinstance(raw, dict) else None
    if isinstance(items, list) and len(items) > max_items:
        raise TooLarge(f"{len(items)} items in one request; the limit is {max_items}")
    if admit is not None and isinstance(items, list):
        admit(_id_count(items))
    try:
        return RewardRequest.model_validate(raw)
    except ValidationError as exc:
        raise _invalid(exc) from None


def _invalid(exc: ValidationError) -> InvalidRequest:
    """The first validation error, naming its item when it is in one."""
    first = exc.errors(include_url=False)[0]
    loc = first["loc"]
    item = loc[1] if len(loc) >= 2 and loc[0] == "items" and isinstance(loc[1], int) else None
    where = ".".join(str(part) for part in loc) or "body"
    return InvalidRequest(f"{where}: {first['msg']}", item=item)


def parse_binary_request(
    body: bytes, max_items: int, admit: Callable[[int], None] | None = None
) -> RewardRequest:
    """:func:`parse_reward_request` for the binary encoding (:mod:`tokenreward.binary`)."""
    try:
        return binary.decode_request(body, max_items, admit)
    except binary.TooManyItemsError as exc:
        raise TooLarge(str(exc)) from None
    except binary.BinaryFormatError as exc:
        raise InvalidRequest(f"binary body: {exc}") from None
    except ValidationError as exc:
        raise _invalid(exc) from None


def _id_count(items: list[Any]) -> int:
    """Token IDs a decoded request carries (a lower bound of its tokens: text counts 0)."""
    count = 0
    for item in items:
        if isinstance(item, dict):
            for key in ("prompt_ids", "response_ids"):
                ids = item.get(key)
                if isinstance(ids, list):
                    count += len(ids)
    return count


def _body(reply: Any) -> bytes:
    return reply if isinstance(reply, bytes) else orjson.dumps(reply)


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def build_router(state: AppState) -> APIRouter:
    async def require_key(request: Request) -> None:
        if not state.authorised(request.headers.get("authorization", "").encode("latin-1")):
            raise Unauthorized("missing or wrong API key; send 'Authorization: Bearer <key>'")

    guarded = [Depends(require_key)]
    router = APIRouter()

    def admit(tokens: int) -> None:
        if tokens > state.max_queued_tokens:  # never fits: refused before validation
            raise TooLarge(
                f"request holds {tokens} token IDs, more than the queue bound "
                f"({state.max_queued_tokens}); split it"
            )
        error = state.queue_refusal(tokens, "the request holds")
        if error is not None:
            raise error

    async def serve(
        request: Request,
        parse: Callable[[bytes], RewardRequest | None],
        reply: Callable[[RewardResponse], Any],
        media_type: str = JSON,
        empty: Any = None,
    ) -> Response:
        """Read, parse, score and answer; ``reply`` gives the body (bytes, or an object for
        JSON); ``empty`` is the answer when ``parse`` finds nothing to score."""
        service = state.require_service()
        try:
            body = await _read_body(request, state)
        except ClientDisconnect:
            return Response(status_code=499)  # the client hung up mid-upload: not our error
        try:
            # A big body goes off the event loop, where it does not stall the probes and the
            # other requests; a small one is cheaper parsed here (see INLINE_BODY_BYTES).
            if len(body.data) <= INLINE_BODY_BYTES:
                reward_request = parse(body.data)
            else:
                reward_request = await asyncio.to_thread(parse, body.data)
        finally:
            state.inflight.give(body.reserved)
        if reward_request is None:  # nothing to score
            return Response(_body(empty), media_type=media_type)
        try:
            result = await _unless_disconnected(service.rewards(reward_request), request.receive)
        except ServiceError as exc:
            state.metrics.rejected_items.labels(exc.type.value).inc(len(reward_request.items))
            raise
        if result is None:  # the client went away; its queued items were dropped
            return Response(status_code=499)
        state.metrics.items.inc(len(result.results))
        return Response(_body(reply(result)), media_type=media_type)

    @router.post("/v1/rewards", dependencies=guarded)
    async def rewards(request: Request) -> Response:
        """JSON, or the binary encoding both ways as ``Content-Type``/``Accept`` name it."""
        binary_in = binary.is_binary(request.headers.get("content-type"))
        parse = parse_binary_request if binary_in else parse_reward_request
        binary_out = binary.is_binary(request.headers.get("accept"))
        return await serve(
            request,
            lambda body: parse(body, state.max_items, admit),
            binary.encode_response if binary_out else lambda r: r.model_dump(mode="json"),
            binary.MEDIA_TYPE if binary_out else JSON,
        )

    @router.post("/get_reward", dependencies=guarded)
    async def get_reward(request: Request) -> Response:
        """OpenRLHF's remote RM (``--reward.remote_url``): see :mod:`.remote_rm`."""
        policies = state.require_service().preparer.policies
        name = request.query_params.get("policy_tokenizer")
        return await serve(
            request,
            lambda body: remote_rm.parse_remote_rm_request(body, state.max_items, policies, name),
            remote_rm.answer,
            empty=remote_rm.EMPTY,
        )

    @router.get("/v1/model", dependencies=guarded)
    async def model_info() -> Response:
        info = state.require_service().model_info()
        return Response(orjson.dumps(info.model_dump(mode="json")), media_type=JSON)

    @router.get("/healthz")
    async def healthz() -> Response:
        """Liveness: the process serves HTTP and its scheduler has not died (a dead scheduler
        cannot be revived in place: the orchestrator must restart the process)."""
        if state.batcher_failed():
            raise InternalError("the batch scheduler failed; restart the process")
        return Response(b'{"status":"ok"}', media_type=JSON)

    @router.get("/readyz")
    async def readyz() -> Response:
        """Readiness, for load balancers and probes (which carry no API key): the model is
        loaded and the scheduler runs; 503 while loading, draining or failed."""
        state.require_service()
        if state.draining:
            raise NotReady("the server is shutting down")
        if not state.batcher_alive():
            raise NotReady("the batcher is not running")
        return Response(b'{"status":"ready"}', media_type=JSON)

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


async def _unless_disconnected(work: Awaitable[Any], receive: Receive) -> Any:
    """Run ``work`` unless the client disconnects first; then cancel it (dropping its queued
    items) and return None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    return None
