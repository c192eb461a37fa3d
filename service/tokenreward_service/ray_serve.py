"""Ray Serve: the service scaled out over a Ray cluster, one code path with ``tokenreward serve``.

Each replica builds the app that ``tokenreward serve`` runs (:func:`~tokenreward_service.app.
create_app`: the same batcher, validation, error shape, API keys and metrics) and Ray Serve
sends it HTTP through its proxy (``@serve.ingress``). Nothing here is a second server:

- :class:`RewardReplica` loads the model once per replica, *before* Ray counts the replica as
  started (so Ray routes nothing to a replica that would answer 503), hands the app to Ray's
  ingress, whose ASGI lifespan starts the batcher, and on shutdown (after Ray has stopped
  routing to it and its ongoing requests are done) the lifespan stops the batcher, which
  finishes what is queued. :meth:`RewardReplica.check_health` fails once the batcher is dead,
  so Ray replaces the replica. :meth:`RewardReplica.rewards` serves in-cluster callers through
  a ``DeploymentHandle``: it sends the request through the same app in process (no socket),
  so it meets the same validation, batcher and metrics as HTTP.
- :func:`build_app` is the application builder named by ``deploy/ray/serve.yaml``
  (``import_path: tokenreward_service.ray_serve:build_app``); its ``args`` carry the settings.
- :func:`proxy_middlewares` gives the errors that Ray's proxy makes itself (a replica that
  died mid-request, no replica yet, Ray's own back-pressure) the service's one error shape
  and a status the client retries; set ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` to
  ``tokenreward_service.ray_serve:proxy_middlewares`` on every Ray node.

Ray itself is imported only inside :func:`deployment` and :func:`build_app`, so this module
(and its type checking) needs no Ray.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import httpx
import orjson
from pydantic import ValidationError

from tokenreward.protocol import (
    ERROR_STATUS,
    ErrorBody,
    ErrorResponse,
    ErrorType,
    RewardRequest,
    RewardResponse,
)
from tokenreward_service.config import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from tokenreward_service.routes import AppState

__all__ = [
    "DEFAULT_OPTIONS",
    "DEPLOYMENT",
    "HandleError",
    "ProxyErrorShape",
    "RewardReplica",
    "build_app",
    "deployment",
    "proxy_middlewares",
]

log = logging.getLogger(__name__)

DEPLOYMENT = "tokenreward"
"""The deployment's (and the application's) name in Ray Serve."""

DEFAULT_OPTIONS: dict[str, Any] = {
    # Ray Serve's default is 5 requests in a replica at once; the rest wait in Ray's proxy,
    # where the batcher cannot see them. Five requests cannot fill a batch from many trainer
    # workers' small requests, and the token-budget admission (429 with Retry-After), the
    # deadlines and the dropping of abandoned work all act on the batcher's queue. So the
    # replica takes as many as `tokenreward serve` does (--max-connections' default) and the
    # batcher decides.
    "max_ongoing_requests": 1000,
    # A replica holds a GPU and takes minutes to load a large model: check it every 10 s and
    # give a slow answer 30 s, as the Kubernetes liveness probe does.
    "health_check_period_s": 10.0,
    "health_check_timeout_s": 30.0,
    # Stopping: Ray stops routing to the replica, waits for its ongoing requests (each within
    # the 120 s request deadline), then the lifespan drains the batcher.
    "graceful_shutdown_timeout_s": 130.0,
    "graceful_shutdown_wait_loop_s": 1.0,
}
"""Deployment options in force when the Serve config does not set them."""


class HandleError(Exception):
    """An error answered to a ``DeploymentHandle`` call: the wire error body, with its HTTP
    status and ``Retry-After`` (for an overloaded replica). It pickles (Ray sends it to the
    caller, as ``RayTaskError`` that is also a :class:`HandleError`)."""

    def __init__(
        self, status: int, type: str, message: str, item: int | None, retry_after: int | None
    ) -> None:
        super().__init__(status, type, message, item, retry_after)
        self.status = status
        self.type = type
        self.message = message
        self.item = item
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = "" if self.item is None else f" (item {self.item})"
        return f"{self.type} [{self.status}]{where}: {self.message}"


class RewardReplica:
    """One replica: the model, loaded once, and the app of ``tokenreward serve`` around it.

    ``settings`` are :class:`~tokenreward_service.config.Settings` fields (the Serve config's
    ``args.settings``); the replica's ``TOKENREWARD_*`` environment fills the rest, as for
    ``tokenreward serve``. ``metrics_port``: each replica also serves its ``/metrics`` on
    ``metrics_port + its rank on the node`` at the settings' ``host``, moving when Ray
    renumbers the replicas (:meth:`reconfigure`; the proxy's ``/metrics`` reaches one replica
    at random, which a scraper cannot use); None: no such listener.

    Without Ray, :meth:`__serve_build_asgi_app__` and the app's lifespan do what Ray does.
    """

    def __init__(
        self, settings: Mapping[str, Any] | None = None, metrics_port: int | None = None
    ) -> None:
        self.settings = Settings(**dict(settings or {}))
        self.metrics_port = metrics_port
        self.metrics_address: tuple[str, int] | None = None
        self._app: FastAPI | None = None
        self._http: httpx.AsyncClient | None = None
        self._metrics_server: Any = None

    async def __serve_build_asgi_app__(self) -> FastAPI:
        """Load the model and build the app (Ray calls this once, then runs the app's
        lifespan, which starts the batcher, before the replica counts as started).

        The model is loaded here rather than behind the lifespan (as ``tokenreward serve``
        does, to answer probes while it loads): Ray routes to a replica as soon as it has
        started, so it must be ready by then. A model that cannot be loaded raises, and Ray
        retries the replica and then marks the deployment failed.
        """
        from tokenreward_service.app import create_app, load_model, load_preparer

        settings = self.settings
        logging.getLogger("tokenreward_service").setLevel(settings.log_level.upper())
        logging.getLogger("transformers").setLevel(logging.ERROR)
        # As `tokenreward serve` does: the inference thread takes the GIL back sooner.
        sys.setswitchinterval(0.001)
        model = await asyncio.to_thread(load_model, settings)
        preparer = await asyncio.to_thread(load_preparer, settings, model)
        app = create_app(settings, model=model, preparer=preparer)
        self._app = app
        if self.metrics_port is not None:
            self._start_metrics(self.metrics_port + _local_rank() if self.metrics_port else 0)
        return app

    @property
    def state(self) -> AppState:
        if self._app is None:
            raise RuntimeError("the replica's app is not built yet")
        state: AppState = self._app.state.tokenreward
        return state

    def check_health(self) -> None:
        """Ray's health check: raises once the replica cannot serve (its model failed to
        load, its batch scheduler died or stopped), so that Ray replaces it."""
        state = self.state
        if state.load_error is not None:
            raise RuntimeError(f"the model could not be loaded: {state.load_error}")
        if state.batcher_failed():
            raise RuntimeError("the batch scheduler failed; this replica cannot serve")
        if not state.ready or not state.batcher_alive():
            raise RuntimeError("the batch scheduler is not running")

    async def rewards(self, request: RewardRequest | Mapping[str, Any]) -> RewardResponse:
        """``POST /v1/rewards`` for in-cluster callers, through a ``DeploymentHandle``::

            handle = serve.get_app_handle("tokenreward")
            response = await handle.rewards.remote(RewardRequest(items=[...]))

        The request (a :class:`~tokenreward.protocol.RewardRequest` or its dict) goes through
        the replica's own app in process: the same validation, admission, batcher, metrics
        (counted under ``/v1/rewards``) and errors as HTTP; an error is raised as
        :class:`HandleError` with the wire body's fields. Handle calls are inside the Ray
        cluster's trust boundary, so they carry the replica's first API key, if it has any.
        """
        raw = request.model_dump(mode="json") if isinstance(request, RewardRequest) else request
        http = self._client()
        answer = await http.post("/v1/rewards", content=orjson.dumps(raw))
        if answer.status_code == 200:
            return RewardResponse.model_validate_json(answer.content)
        raise _handle_error(answer)

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            if self._app is None:
                raise RuntimeError("the replica's app is not built yet")
            headers = {"Content-Type": "application/json"}
            if self.settings.api_keys:
                headers["Authorization"] = f"Bearer {self.settings.api_keys[0]}"
            self._http = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=self._app),
                base_url="http://replica",
                headers=headers,
                timeout=None,  # the app's own deadlines apply
            )
        return self._http

    async def reconfigure(self, user_config: Any, rank: Any = None) -> None:
        """Ray calls this as the replica starts and whenever it renumbers the replicas
        (``rank``: Ray's ``ReplicaRank``); the /metrics listener follows the local rank.

        Ray gives a replica that starts while the one it replaces is still stopping (a failed
        health check, a rolling update) the next rank on the node, and once that one is gone
        moves it to the rank left free, so that a node's N replicas hold ranks 0 .. N-1.
        Following that keeps ``metrics_port`` .. ``metrics_port + N - 1``, the ports a scrape
        configuration lists, on every replica of the node. Should the port still be taken, the
        listener stays where it is (the replica serves on; only that scrape target is off).

        ``user_config`` has no use here: the settings come from the application's ``args``.
        """
        if user_config is not None:
            raise ValueError("tokenreward takes no user_config; set the application's args")
        if rank is None or not self.metrics_port or self._metrics_server is None:
            return
        port = self.metrics_port + int(rank.local_rank)
        if self.metrics_address is not None and self.metrics_address[1] == port:
            return
        try:
            await asyncio.to_thread(self._start_metrics, port)
        except OSError as exc:
            log.warning(
                "replica metrics stay on %s: port %d is taken (%s)", self.metrics_address, port, exc
            )

    def _start_metrics(self, port: int) -> None:
        """Serve the registry on ``port`` (0: any free one), then close the listener that this
        one replaces (so that the metrics are never out of reach in between)."""
        from prometheus_client import start_http_server

        server, _ = start_http_server(
            port, addr=self.settings.host, registry=self.state.metrics.registry
        )
        replaced, self._metrics_server = self._metrics_server, server
        host, bound = server.server_address[:2]
        self.metrics_address = (str(host), int(bound))
        log.info("replica metrics on http://%s:%d/metrics", host, bound)
        if replaced is not None:
            replaced.shutdown()
            replaced.server_close()

    def __del__(self) -> None:
        # Ray calls this after the lifespan's shutdown (the batcher has drained).
        server = getattr(self, "_metrics_server", None)
        if server is not None:
            self._metrics_server = None
            server.shutdown()
            server.server_close()


def _local_rank() -> int:
    """This replica's rank among the deployment's replicas on its node (0 outside Ray)."""
    try:
        serve = importlib.import_module("ray.serve")
        return int(serve.get_replica_context().rank.local_rank)
    except Exception:  # not in a replica
        return 0


def _handle_error(answer: httpx.Response) -> HandleError:
    try:
        body = ErrorResponse.model_validate_json(answer.content).error
    except ValidationError:
        text = answer.content[:200].decode("utf-8", "replace")
        return HandleError(answer.status_code, ErrorType.INTERNAL.value, text, None, None)
    retry_after = answer.headers.get("retry-after")
    return HandleError(
        answer.status_code,
        body.type.value,
        body.message,
        body.item,
        int(retry_after) if retry_after is not None and retry_after.isdigit() else None,
    )


def deployment(**options: Any) -> Any:
    """The Ray Serve deployment (a ``serve.Deployment``) of :class:`RewardReplica`, with
    :data:`DEFAULT_OPTIONS` and ``options`` (``serve.deployment`` keywords) over them; the
    Serve config's ``deployments`` entry overrides both."""
    serve = importlib.import_module("ray.serve")
    ingress = serve.ingress()(RewardReplica)  # the app is built in the replica, late-bound
    return serve.deployment(name=DEPLOYMENT, **{**DEFAULT_OPTIONS, **options})(ingress)


def build_app(args: dict[str, Any]) -> Any:
    """The Serve application builder (``import_path: tokenreward_service.ray_serve:build_app``).

    ``args``: ``settings`` (a mapping of Settings fields) and ``metrics_port`` (see
    :class:`RewardReplica`). The settings are validated here, so a wrong one fails the
    deployment at once instead of in every replica.
    """
    unknown = set(args) - {"settings", "metrics_port"}
    if unknown:
        raise ValueError(f"unknown application arguments: {sorted(unknown)}")
    settings = dict(args.get("settings") or {})
    Settings(**settings)
    metrics_port = args.get("metrics_port")
    return deployment().bind(settings, None if metrics_port is None else int(metrics_port))


# -- Ray's proxy ------------------------------------------------------------------------------


class ProxyErrorShape:
    """ASGI middleware for Ray's HTTP proxy: the errors the proxy makes itself get the
    service's one error shape, ``{"error": {"type", "message", "item"}}``.

    The replica's answers already have it (JSON) and pass untouched, as do Ray's own routes
    (``/-/healthz``, ``/-/routes``). What the proxy makes is plain text, or nothing at all:
    when the replica holding the request dies, the proxy ends without an answer and uvicorn
    would send a bare 500, which clients must not retry (a 500 means the same request would
    fail again). Here that becomes ``not_ready`` 503, which clients retry: scoring is a pure
    function of the request, so sending it again is safe. A status of the error table keeps
    its type (404 ``not_found``, 429 ``overloaded`` with Ray's ``Retry-After``, 503
    ``not_ready``, 504 ``timeout``; Ray's 408 request timeout becomes 504 ``timeout``); any
    other becomes 503 ``not_ready``.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or str(scope.get("path", "")).startswith("/-/"):
            await self.app(scope, receive, send)
            return
        started = False
        held: Message | None = None  # the head of a shapeless error, until its body is read
        text: list[bytes] = []

        async def shaped(message: Message) -> None:
            nonlocal started, held
            if message["type"] == "http.response.start":
                started = True
                if int(message["status"]) >= 400 and not _is_json(message.get("headers", [])):
                    held = message
                    return
            elif held is not None and message["type"] == "http.response.body":
                text.append(message.get("body", b""))
                if not message.get("more_body", False):
                    await _send_error(send, int(held["status"]), b"".join(text), held)
                return
            await send(message)

        try:
            await self.app(scope, receive, shaped)
        except Exception as exc:
            if started:
                raise
            log.warning("Ray's proxy failed a request: %s", exc)
        if not started:
            message = b"the replica serving this request stopped before answering"
            await _send_error(send, 500, message, None)


def _is_json(headers: Any) -> bool:
    for name, value in headers:
        if bytes(name).lower() == b"content-type":
            return bytes(value).split(b";")[0].strip() == b"application/json"
    return False


async def _send_error(send: Send, status: int, text: bytes, head: Message | None) -> None:
    kind = {404: ErrorType.NOT_FOUND, 429: ErrorType.OVERLOADED, 408: ErrorType.TIMEOUT}.get(
        status
    ) or next((t for t, s in ERROR_STATUS.items() if s == status), None)
    if kind not in (ErrorType.NOT_FOUND, ErrorType.OVERLOADED, ErrorType.TIMEOUT):
        kind = ErrorType.NOT_READY
    message = "Ray Serve: " + (text.decode("utf-8", "replace").strip() or f"HTTP {status}")
    body = ErrorResponse(error=ErrorBody(type=kind, message=message[:1000], item=None))
    headers = [(b"content-type", b"application/json")]
    if head is not None:
        headers += [
            (bytes(n), bytes(v))
            for n, v in head.get("headers", [])
            if bytes(n).lower() in (b"retry-after", b"x-request-id")
        ]
    if kind is ErrorType.OVERLOADED and not any(n == b"retry-after" for n, _ in headers):
        headers.append((b"retry-after", b"1"))
    content = orjson.dumps(body.model_dump(mode="json"))
    headers.append((b"content-length", str(len(content)).encode()))
    await send({"type": "http.response.start", "status": ERROR_STATUS[kind], "headers": headers})
    await send({"type": "http.response.body", "body": content, "more_body": False})


def proxy_middlewares() -> list[Any]:
    """Ray's proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=
    tokenreward_service.ray_serve:proxy_middlewares``): :class:`ProxyErrorShape`."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyErrorShape)]
