"""tokenreward: the client side of the token-level reward service.

Importing this package never imports torch, transformers or the server.
"""

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
    "ErrorBody",
    "ErrorResponse",
    "ErrorType",
    "ModelInfo",
    "ModelRef",
    "RewardItem",
    "RewardRequest",
    "RewardResponse",
    "RewardResult",
    "__version__",
]
