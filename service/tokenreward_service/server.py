"""The HTTP server around the app: connection limits, a request-head deadline, and a shutdown
that fails readiness before it stops accepting.

uvicorn closes idle kept-alive connections, but not a connection that never finishes sending
its request head (slowloris), nor one that never sends a byte: those would hold a file
descriptor each for ever. :func:`guarded_h11` adds that deadline. :class:`DrainingServer`
answers SIGTERM by failing ``/readyz`` for ``shutdown_delay_s`` while it still serves, then
lets uvicorn stop accepting and drain, and exits 0 after a clean drain.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from types import FrameType
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from tokenreward_service.config import Settings

__all__ = ["DrainingServer", "build_server", "guarded_h11"]


def guarded_h11(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection that has not sent a complete request
    head within ``header_timeout_s`` of opening or of its last answer."""

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # no request in progress: nothing to answer

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()  # the head is complete; the app's body deadline takes over

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol


class DrainingServer(uvicorn.Server):
    """SIGTERM: readiness fails first (``on_draining``), serving goes on for ``delay_s``, then
    uvicorn stops accepting and drains. A second signal, or SIGINT, stops at once. The signal
    is not raised again after a clean drain, so the process exits 0."""

    def __init__(self, config: uvicorn.Config, *, delay_s: float, on_draining: Any) -> None:
        super().__init__(config)
        self._delay_s = delay_s
        self._on_draining = on_draining
        self._timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self._timer is None and self._delay_s > 0:
            self._on_draining()
            self._timer = threading.Timer(self._delay_s, self._stop)
            self._timer.daemon = True
            self._timer.start()
            return
        if self._timer is not None:
            self._timer.cancel()
        self._on_draining()
        self._stop(force=self.should_exit and sig == signal.SIGINT)

    def _stop(self, force: bool = False) -> None:
        if force:
            self.force_exit = True
        self.should_exit = True


def build_server(settings: Settings, app: Any, *, port: int | None = None) -> DrainingServer:
    """The uvicorn server for ``app`` with the settings' connection limits and shutdown."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port if port is None else port,
        log_level=settings.log_level,
        access_log=settings.log_level == "debug",
        http=guarded_h11(settings.header_timeout_s),
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=int(settings.request_timeout_s),
        lifespan="on",
    )
    state = app.state.tokenreward

    def draining() -> None:
        state.draining = True

    return DrainingServer(config, delay_s=settings.shutdown_delay_s, on_draining=draining)
