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
    "Message",
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


class _Answer(BaseModel):
    """What the server sends back: fields a newer server adds are ignored, never an error, so an
    older client keeps working against a newer server."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class Message(_Wire):
    """One turn of the conversation before the response, as chat templates take it."""

    role: Literal["system", "user", "assistant"]
    content: str


class RewardItem(_Wire):
    """One prompt/response pair to score.

    The prompt is ``prompt_ids`` (token IDs), ``prompt`` (text, tokenized by the server with the
    RM's tokenizer) or ``messages`` (the conversation before the response, rendered with the
    RM's chat template). The response is ``response_ids`` or ``response`` (text). IDs go with
    IDs and text with text; ``messages`` goes with either. IDs are in the RM's vocabulary, or
    in the policy's when the request names a ``policy_tokenizer``.
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
    messages: list[Message] | None = Field(
        default=None,
        min_length=1,
        description="The conversation before the response, instead of prompt_ids or prompt; "
        "the response becomes the last assistant turn of the RM's chat template.",
    )

    @model_validator(mode="after")
    def _one_form(self) -> RewardItem:
        prompts = [
            name
            for name, value in (
                ("prompt_ids", self.prompt_ids),
                ("prompt", self.prompt),
                ("messages", self.messages),
            )
            if value is not None
        ]
        has_ids, has_text = self.response_ids is not None, self.response is not None
        if len(prompts) != 1 or has_ids == has_text:
            responses = [
                n for n, given in (("response_ids", has_ids), ("response", has_text)) if given
            ]
            raise ValueError(
                "an item holds one prompt (prompt_ids, prompt or messages) and one response "
                f"(response_ids or response); got {' and '.join(prompts + responses) or 'none'}"
            )
        if (prompts[0], has_ids) in (("prompt_ids", False), ("prompt", True)):
            raise ValueError(
                "prompt_ids goes with response_ids and prompt text with response text (messages "
                "goes with either); never a mix of the two"
            )
        if self.messages is not None and not any(m.role == "user" for m in self.messages):
            raise ValueError("messages needs at least one user turn")
        return self

    @property
    def is_text(self) -> bool:
        """Whether the server needs a tokenizer to score this item as it is."""
        return self.prompt_ids is None or self.response_ids is None


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
    policy_tokenizer: str | None = Field(
        default=None,
        min_length=1,
        description="Name of a policy tokenizer loaded by the server: the items' token IDs are "
        "in its vocabulary, and each result has one reward per policy response token.",
    )
    step_separator: str | None = Field(
        default=None,
        min_length=1,
        description="Split each response's text at this string (e.g. '\\n\\n') and also "
        "return the sum of the token rewards of each step.",
    )


class ModelRef(_Answer):
    id: str
    revision: str


class RewardResult(_Answer):
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
        default=None,
        description="For text and policy-token items: the response text of each token.",
    )
    response_offsets: list[tuple[int, int]] | None = Field(
        default=None,
        description="For text and policy-token items: each token's [start, end) character span "
        "in the response text (the decoded response for policy tokens).",
    )
    step_rewards: list[float] | None = Field(
        default=None,
        description="With step_separator: the sum of the token rewards of each step.",
    )
    step_ends: list[int] | None = Field(
        default=None,
        description="With step_separator: the index of each step's last response token.",
    )


class RewardResponse(_Answer):
    model: ModelRef
    results: list[RewardResult]


class ModelInfo(_Answer):
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
    chat_template: bool = Field(
        default=False, description="Whether items may carry messages (the RM has a chat template)."
    )
    policy_tokenizers: list[str] = Field(
        default_factory=list, description="Names a request may give as policy_tokenizer."
    )
    encodings: list[str] = Field(
        default_factory=lambda: ["application/json"],
        description="Media types POST /v1/rewards reads and writes (Content-Type and Accept).",
    )
    format: str | None = Field(
        default=None,
        description="How the model folder was read: sequence-classification, openrlhf, "
        "trl-value-head, custom-code or adapter.",
    )
    head: str | None = Field(
        default=None,
        description="What is read at every position: the linear head's name, or "
        "'adapter <entry point>'.",
    )
    objective: str | None = Field(
        default=None,
        description="What a multi-objective head redistributes ('column 1', 'weights "
        "0.5,0.5'); null for a one-output head.",
    )
    normalization: str | None = Field(
        default=None,
        description="'(score - mean) / std' when scores are normalised (OpenRLHF); null if not.",
    )


class ErrorBody(_Answer):
    type: ErrorType
    message: str
    item: int | None = None


class ErrorResponse(_Answer):
    """The body of every non-2xx response."""

    error: ErrorBody
