"""Domain errors of the service.

The engine, the batcher and the serving layer raise these; only the HTTP edge turns them into
responses, through the one status table in :mod:`tokenreward.protocol`.
"""

from __future__ import annotations

from tokenreward.protocol import ErrorType


class ServiceError(Exception):
    """Root of every error the service answers with. ``item`` names the offending item."""

    type: ErrorType = ErrorType.INTERNAL

    def __init__(self, message: str, *, item: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.item = item


class InvalidRequest(ServiceError):
    type = ErrorType.INVALID_REQUEST


class TooLarge(ServiceError):
    type = ErrorType.TOO_LARGE


class Unauthorized(ServiceError):
    type = ErrorType.UNAUTHORIZED


class NotFound(ServiceError):
    type = ErrorType.NOT_FOUND


class MethodNotAllowed(ServiceError):
    type = ErrorType.METHOD_NOT_ALLOWED


class Overloaded(ServiceError):
    """The queue is full; retry after ``retry_after`` seconds."""

    type = ErrorType.OVERLOADED

    def __init__(self, message: str, *, retry_after: int, close: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.close = close
        """Refused before its body was read: close the connection rather than read and
        discard the rest of the body (under a storm of refusals that is most of the cost)."""


class DeadlineExceeded(ServiceError):
    type = ErrorType.TIMEOUT


class NotReady(ServiceError):
    type = ErrorType.NOT_READY


class InternalError(ServiceError):
    type = ErrorType.INTERNAL


class ModelLoadError(Exception):
    """The reward model cannot be served (wrong kind, bidirectional, missing head, ...)."""
