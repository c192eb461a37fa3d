"""The client's exception tree: one root, :class:`RewardClientError`.

Errors from the server are mapped from the wire error shape first (its ``type``), from the HTTP
status second (a proxy's bare 502 has no body); transport errors from httpx are translated at
one boundary, so callers never need to catch httpx's own exceptions.
"""

from __future__ import annotations

from tokenreward.protocol import ERROR_STATUS, ErrorType

__all__ = [
    "APIError",
    "BadResponseError",
    "ConnectionFailedError",
    "DeadlineExceededError",
    "InternalServerError",
    "InvalidRequestError",
    "NotFoundError",
    "NotReadyError",
    "OverloadedError",
    "RequestTooLargeError",
    "RewardClientError",
    "ServerTimeoutError",
    "UnauthorizedError",
]


class RewardClientError(Exception):
    """Root of every error the client raises.

    ``items`` are the indices (in the caller's list) of the items whose rewards the failed call
    did not get; a call that raises returns nothing, so all of its items are named.
    """

    def __init__(self, message: str, *, items: range | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.items = items

    def __str__(self) -> str:
        if self.items is None:
            return self.message
        return f"{self.message} (items {self.items.start}..{self.items.stop - 1})"


class ConnectionFailedError(RewardClientError):
    """No endpoint could be reached, or a connection broke mid-request, after every retry."""


class DeadlineExceededError(RewardClientError):
    """The call's overall deadline passed before every item had its reward."""


class BadResponseError(RewardClientError):
    """The server answered 2xx with a body that does not match the request (wrong count, ids)."""


class APIError(RewardClientError):
    """The server answered with an error. ``type``, ``status``, ``item`` and ``request_id``
    identify it; ``item`` is the index in the caller's list when the server named one."""

    error_type: ErrorType = ErrorType.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        status: int,
        item: int | None = None,
        request_id: str | None = None,
        items: range | None = None,
        endpoint: str | None = None,
    ) -> None:
        super().__init__(message, items=items)
        self.status = status
        self.item = item
        self.request_id = request_id
        self.endpoint = endpoint


class InvalidRequestError(APIError):
    error_type = ErrorType.INVALID_REQUEST


class RequestTooLargeError(APIError):
    error_type = ErrorType.TOO_LARGE


class UnauthorizedError(APIError):
    error_type = ErrorType.UNAUTHORIZED


class NotFoundError(APIError):
    error_type = ErrorType.NOT_FOUND


class OverloadedError(APIError):
    """429: the server's queue is full. ``retry_after`` is its advice, in seconds."""

    error_type = ErrorType.OVERLOADED

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class ServerTimeoutError(APIError):
    error_type = ErrorType.TIMEOUT


class NotReadyError(APIError):
    error_type = ErrorType.NOT_READY


class InternalServerError(APIError):
    error_type = ErrorType.INTERNAL


BY_TYPE: dict[ErrorType, type[APIError]] = {
    ErrorType.INVALID_REQUEST: InvalidRequestError,
    ErrorType.TOO_LARGE: RequestTooLargeError,
    ErrorType.UNAUTHORIZED: UnauthorizedError,
    ErrorType.NOT_FOUND: NotFoundError,
    ErrorType.METHOD_NOT_ALLOWED: NotFoundError,
    ErrorType.OVERLOADED: OverloadedError,
    ErrorType.TIMEOUT: ServerTimeoutError,
    ErrorType.NOT_READY: NotReadyError,
    ErrorType.INTERNAL: InternalServerError,
}
"""Wire error type -> exception class."""

BY_STATUS: dict[int, type[APIError]] = {
    status: BY_TYPE[kind] for kind, status in ERROR_STATUS.items()
}
"""HTTP status -> exception class, for answers without the wire error shape."""
