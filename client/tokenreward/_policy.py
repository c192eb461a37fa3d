"""Retry and endpoint policy of the clients: pure, thread-safe, no I/O."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Endpoint", "EndpointPool", "RetryPolicy"]


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential back-off with jitter, honouring the server's ``Retry-After``."""

    max_attempts: int = 10
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 10.0
    jitter: float = 0.5
    """Fraction of each delay drawn at random, so that many clients do not retry in step."""

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 0)."""
        base = min(self.max_backoff_s, self.initial_backoff_s * 2.0**attempt)
        delay = base * (1.0 - self.jitter * rng.random())
        if retry_after is not None:
            delay = max(delay, min(retry_after, 60.0))
        return delay


@dataclass(eq=False)
class Endpoint:
    url: str
    in_flight: int = 0
    failures: int = 0
    down_until: float = 0.0
    busy_until: float = 0.0
    """It answered 429 with a Retry-After reaching to here: other replicas go first."""


class EndpointPool:
    """Replicas of the service; each request goes to the healthy one with fewest in flight.

    An endpoint that fails at the connection level or answers 5xx is set aside for a back-off
    that doubles with each consecutive failure; once it has passed, the endpoint is probed by
    real traffic again. When all are set aside, the one due back first is tried. Thread-safe:
    the sync client sends chunks from several threads.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not urls:
            raise ValueError("at least one base URL is needed")
        self.endpoints = [Endpoint(url.rstrip("/")) for url in urls]
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._clock = clock
        self._lock = threading.Lock()
        self._turn = 0

    def acquire(self, avoid: Endpoint | None = None) -> Endpoint:
        with self._lock:
            now = self._clock()
            healthy = [e for e in self.endpoints if e.down_until <= now]
            idle = [e for e in healthy if e.busy_until <= now]
            healthy = idle or healthy
            if avoid is not None and len(healthy) > 1:
                healthy = [e for e in healthy if e is not avoid] or healthy
            if healthy:
                least = min(e.in_flight for e in healthy)
                tied = [e for e in healthy if e.in_flight == least]
                self._turn += 1
                chosen = tied[self._turn % len(tied)]
            else:
                chosen = min(self.endpoints, key=lambda e: e.down_until)
            chosen.in_flight += 1
            return chosen

    def overloaded(self, endpoint: Endpoint, retry_after_s: float) -> None:
        """The endpoint answered 429: prefer the others for ``retry_after_s`` seconds."""
        with self._lock:
            endpoint.busy_until = self._clock() + retry_after_s

    def idle_other(self, endpoint: Endpoint) -> bool:
        """Whether another endpoint is up and not overloaded (worth trying at once)."""
        with self._lock:
            now = self._clock()
            return any(
                e is not endpoint and e.down_until <= now and e.busy_until <= now
                for e in self.endpoints
            )

    def release(self, endpoint: Endpoint, *, failed: bool) -> None:
        with self._lock:
            endpoint.in_flight -= 1
            if failed:
                endpoint.failures += 1
                backoff = self._backoff_s * 2.0 ** (endpoint.failures - 1)
                endpoint.down_until = self._clock() + min(self._max_backoff_s, backoff)
            else:
                endpoint.failures = 0
                endpoint.down_until = 0.0
