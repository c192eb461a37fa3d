"""tokenreward: the client side of the token-level reward service.

``RewardClient`` / ``AsyncRewardClient`` send prompt/response token IDs to one or several
replicas and return one :class:`RewardResult` per item, in order, or raise a
:class:`RewardClientError`. Importing this package never imports torch, transformers or the
server.
"""

from tokenreward._base import ItemLike
from tokenreward._client import AsyncRewardClient, RewardClient
from tokenreward._errors import (
    APIError,
    BadResponseError,
    ConnectionFailedError,
    DeadlineExceededError,
    InternalServerError,
    InvalidRequestError,
    NotFoundError,
    NotReadyError,
    OverloadedError,
    RequestTooLargeError,
    RewardClientError,
    ServerTimeoutError,
    UnauthorizedError,
)
from tokenreward._policy import RetryPolicy
from tokenreward.protocol import (
    ERROR_STATUS,
    ErrorBody,
    ErrorResponse,
    ErrorType,
    ModelInfo,
    ModelRef,
    RewardItem,
    RewardRequest,
    RewardResponse,
    RewardResult,
)

__version__ = "0.1.0"

__all__ = [
    "ERROR_STATUS",
    "APIError",
    "AsyncRewardClient",
    "BadResponseError",
    "ConnectionFailedError",
    "DeadlineExceededError",
    "ErrorBody",
    "ErrorResponse",
    "ErrorType",
    "InternalServerError",
    "InvalidRequestError",
    "ItemLike",
    "ModelInfo",
    "ModelRef",
    "NotFoundError",
    "NotReadyError",
    "OverloadedError",
    "RequestTooLargeError",
    "RetryPolicy",
    "RewardClient",
    "RewardClientError",
    "RewardItem",
    "RewardRequest",
    "RewardResponse",
    "RewardResult",
    "ServerTimeoutError",
    "UnauthorizedError",
    "__version__",
]
