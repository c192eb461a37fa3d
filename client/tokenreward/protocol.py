"""Wire models of the tokenreward HTTP API (v1): the one definition of the format.

The server validates requests with these models and builds its responses with them; the client
builds requests and parses responses with the same models, so the two cannot drift apart.
Everything here is plain pydantic and imports nothing heavy.
"""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

__all__ = [
    "ERROR_STATUS",
    "Baseline",
    "ErrorBody",
    "ErrorResponse",
    "ErrorType",
    "ModelInfo",
    "ModelRef",
    "RewardItem",
    "RewardRequest",
    "RewardResponse",
    "RewardResult",
]

Baseline = Literal["prompt", "zero"]
"""How the prefix score before the first response token, ``s_0``, is chosen.

``"prompt"``: ``s_0`` is the score read at the last prompt token (the paper's dynamic
initialisation), so the rewards sum to ``score - prompt_score``. ``"zero"``: ``s_0 = 0`` and the
rewards sum to exactly ``score``.
"""


class ErrorType(str, enum.Enum):
    """Every error the API can answer with; each maps to exactly one HTTP status."""

    INVALID_REQUEST = "invalid_request"
    TOO_LARGE = "too_large"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    OVERLOADED = "overloaded"
    TIMEOUT = "timeout"
    NOT_READY = "not_ready"
    INTERNAL = "internal"


ERROR_STATUS: dict[ErrorType, int] = {
    ErrorType.INVALID_REQUEST: 422,
    ErrorType.TOO_LARGE: 413,
    ErrorType.UNAUTHORIZED: 401,
    ErrorType.NOT_FOUND: 404,
    ErrorType.METHOD_NOT_ALLOWED: 405,
    ErrorType.OVERLOADED: 429,
    ErrorType.TIMEOUT: 504,
    ErrorType.NOT_READY: 503,
    ErrorType.INTERNAL: 500,
}
"""The one table from error type to HTTP status, used by the server and the client alike."""


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RewardItem(_Wire):
    """One prompt/response pair to score.

    Either as token IDs of the reward model's tokenizer (``prompt_ids`` and ``response_ids``,
    the primary form) or as text (``prompt`` and ``response``, tokenized by the server with the
    RM's tokenizer); never a mix of the two.
    """

    id: str | None = Field(default=None, max_length=256, description="Echoed back in the result.")
    prompt_ids: list[StrictInt] | None = Field(
        default=None, description="Prompt token IDs (may be empty with baseline 'zero')."
    )
    response_ids: list[StrictInt] | None = Field(
        default=None, min_length=1, description="Response token IDs, at least one."
    )
    prompt: str | None = Field(default=None, description="Prompt text, instead of prompt_ids.")
    response: str | None = Field(
        default=None, min_length=1, description="Response text, instead of response_ids."
    )

    @model_validator(mode="after")
    def _one_form(self) -> RewardItem:
        ids = (self.prompt_ids is not None, self.response_ids is not None)
        text = (self.prompt is not None, self.response is not None)
        if ids == (True, True) and text == (False, False):
            return self
        if text == (True, True) and ids == (False, False):
            return self
        raise ValueError(
            "an item holds either prompt_ids and response_ids, or prompt and response text; "
            "never a mix of the two"
        )

    @property
    def is_text(self) -> bool:
        return self.prompt is not None


class RewardRequest(_Wire):
    """Body of ``POST /v1/rewards``."""

    items: list[RewardItem] = Field(min_length=1)
    beta_c: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Weight of the dense reward against the sparse one (Eq. 7); 1 is dense only.",
    )
    baseline: Baseline = "prompt"
    return_prefix_scores: bool = False


class ModelRef(_Wire):
    id: str
    revision: str


class RewardResult(_Wire):
    """Per-item result: one reward per response token, in order."""

    id: str | None
    token_rewards: list[float]
    score: float = Field(description="R(x, y): the holistic score, read after any suffix tokens.")
    prompt_score: float | None = Field(
        description="R(x, ∅): the score at the last prompt token; null for an empty prompt."
    )
    prefix_scores: list[float] | None = Field(
        default=None,
        description="Score after each response token (the last one includes the suffix), "
        "when requested.",
    )
    response_tokens: list[str] | None = Field(
        default=None, description="For text items: the response text of each token."
    )
    response_offsets: list[tuple[int, int]] | None = Field(
        default=None,
        description="For text items: each token's [start, end) character span in the response.",
    )


class RewardResponse(_Wire):
    model: ModelRef
    results: list[RewardResult]


class ModelInfo(_Wire):
    """Body of ``GET /v1/model``: what is loaded and how it is run."""

    id: str
    revision: str
    architecture: str
    vocab_size: int
    max_length: int
    dtype: str
    device: str
    suffix_ids: list[int]
    random_weights: bool = Field(
        default=False, description="True when the weights are random (no real model was given)."
    )


class ErrorBody(_Wire):
    type: ErrorType
    message: str
    item: int | None = None


class ErrorResponse(_Wire):
    """The body of every non-2xx response."""

    error: ErrorBody
