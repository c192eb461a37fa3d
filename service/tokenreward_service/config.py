"""Settings: the only place that reads the environment.

Every field is also a ``tokenreward serve`` flag (``--max-batch-tokens``) and an environment
variable (``TOKENREWARD_MAX_BATCH_TOKENS``); the CLI builds its flags from this class, so a new
setting is a new field here and nothing else. Flags win over the environment, which wins over
the defaults. Each description states the trade-off the setting makes.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Self

Device = str
DType = Literal["auto", "float32", "bfloat16", "float16"]


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


MAX_BYTES_PER_TOKEN_ID = 8
"""The most bytes a token ID takes in a compact JSON request (7 digits and a comma)."""


class Settings(BaseSettings):
    """Validated service settings. Build with ``Settings()`` (environment) or keyword overrides."""

    model_config = SettingsConfigDict(
        env_prefix="TOKENREWARD_", extra="forbid", frozen=True, validate_default=True
    )

    model: str | None = Field(
        default=None,
        description="Path of a local reward model folder: a Hugging Face sequence-"
        "classification model, an OpenRLHF or TRL value-head checkpoint, or a custom "
        "architecture (trust_remote_code, adapter). Unset: the embedded default model.",
    )
    objective: int | None = Field(
        default=None,
        ge=0,
        description="Column of a multi-objective head (num_labels > 1) whose scores are "
        "redistributed; such a model is refused without this or objective_weights. Each "
        "column is a different reward: choose the one the policy should learn.",
    )
    objective_weights: Annotated[list[float] | None, NoDecode] = Field(
        default=None,
        description="Weights of the columns of a multi-objective head, comma separated: the "
        "weighted sum is redistributed (one weight per column). Token rewards are linear in "
        "them, so this equals the weighted sum of each objective's token rewards.",
    )
    normalize_reward: bool | None = Field(
        default=None,
        description="Normalise scores as OpenRLHF does, (score - mean) / std with mean and std "
        "from config.json. Unset: config.json's normalize_reward. Token rewards scale by "
        "1/std and the mean cancels in them; score and prompt_score move by -mean/std.",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Load a model folder whose architecture is its own Python code (auto_map "
        "in config.json). That code runs in the server with its rights: read it first.",
    )
    adapter: str | None = Field(
        default=None,
        description="Per-position scores from a Python function instead of a linear head: "
        "'module:function' or 'file.py:function' (default function 'scores'), called as "
        "f(model, input_ids, attention_mask) -> [batch, seq]. For heads that are not a "
        "linear layer; items sharing a prompt then compute it each.",
    )
    host: str = Field(
        default="127.0.0.1",
        description="Address to bind. The default serves this machine only; use 0.0.0.0 in a "
        "container or to serve the network (then set api_keys).",
    )
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    device: Device = Field(
        default="auto",
        description="'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'.",
    )
    dtype: DType = Field(
        default="auto",
        description="Weights dtype. 'auto' is bfloat16 on CUDA (fast, the head still runs in "
        "float32) and float32 on CPU (exact, and bf16 is slow on most CPUs).",
    )
    max_length: int | None = Field(
        default=None,
        ge=1,
        description="Longest sequence (prompt + response + suffix) accepted. Unset: the model's "
        "own maximum. Longer items are refused, never truncated.",
    )
    suffix_ids: Annotated[list[int] | None, NoDecode] = Field(
        default=None,
        description="Token IDs the RM was trained to be read at after the response (e.g. EOS), "
        "comma separated. Unset: the model folder's tokenreward.json, else none.",
    )
    chat_template: str | None = Field(
        default=None,
        description="A Jinja chat template file used to render 'messages' items, instead of the "
        "RM tokenizer's own template. Unset: the tokenizer's template; without one, messages "
        "items are refused with 422.",
    )
    policy_tokenizers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Policy tokenizers as NAME=PATH (a Hugging Face tokenizer folder); the flag "
        "repeats, the environment variable is comma separated. A request naming one sends "
        "token IDs of that policy and gets one reward per policy token. Each costs its "
        "vocabulary's bytes in memory (a few MB).",
        json_schema_extra={"flag": "policy-tokenizer", "repeatable": True},
    )
    max_batch_tokens: int = Field(
        default=16384,
        ge=1,
        description="Padded-token budget of one forward pass (longest x count). Higher: more "
        "throughput, more activation memory and latency per batch.",
    )
    max_batch_size: int = Field(
        default=256, ge=1, description="Most items in one forward pass, whatever their length."
    )
    min_padding_efficiency: float = Field(
        default=0.9,
        ge=0.0,
        le=1.0,
        description="A batch stops growing when real / padded tokens would fall below this. "
        "Higher: less compute wasted on padding, more and smaller forward passes; 0 fills the "
        "token budget whatever the padding.",
    )
    max_wait_ms: float = Field(
        default=2.0,
        ge=0.0,
        description="How long a batch that is not full waits for more items. Higher: fuller "
        "batches under light load, at that much added latency.",
    )
    max_queued_tokens: int = Field(
        default=1_048_576,
        ge=1,
        description="Bound on tokens waiting for the model; past it requests get 429 at once. "
        "Higher: absorbs bursts, but queued work waits longer.",
    )
    batching: Literal["on", "off"] = Field(
        default="on",
        description="'on': items of concurrent requests share forward passes. 'off': each "
        "request's items run alone (lower throughput; for comparison and debugging).",
    )
    engine_process: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Run the batcher and the model in a child process of their own, fed by "
        "the server's, so that the HTTP, JSON and per-request work does not hold the GIL "
        "that the forward pass needs: worth it in front of a fast device, where the host "
        "path decides the throughput; it costs a process (the model's memory is in it "
        "alone) and a copy of each request's tokens and scores between the two. 'auto': on "
        "when the model runs on an accelerator, off on the CPU. Only when the server loads "
        "the model itself (not for a model handed to create_app, as Ray Serve does).",
    )
    share_prompts: bool = Field(
        default=True,
        description="Score a prompt shared by several items of a batch once and reuse its "
        "key/value cache for their responses (GRPO/RLOO groups). Costs a second, smaller "
        "forward call per batch that has such groups.",
    )
    max_items_per_request: int = Field(
        default=4096, ge=1, description="Most items in one request; more gets 413."
    )
    max_request_bytes: int | None = Field(
        default=None,
        ge=1024,
        description="Largest request body; more gets 413 before a byte of it is read. Unset: "
        f"{MAX_BYTES_PER_TOKEN_ID} bytes per token of --max-queued-tokens (a token ID below 10M "
        "takes at most 7 digits and a comma in JSON), so a request of token IDs that the queue "
        "can hold fits, and one several times larger is refused unread.",
    )
    request_timeout_s: float = Field(
        default=120.0,
        gt=0.0,
        description="Deadline of a request; queued work past it is dropped and answered 504.",
    )
    max_connections: int = Field(
        default=1000,
        ge=1,
        description="Most open connections (and requests in progress); past it new "
        "connections get 503 at once. Keep it under the process's open-file limit, or idle "
        "connections can starve everyone.",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0.0,
        description="A connection that has not sent a complete request head this long after "
        "opening (or after its last answer) is closed: slow or idle clients cannot hold "
        "connections forever.",
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0.0,
        description="Deadline for receiving a request's body; a slower upload is answered 504. "
        "Lower: stalled uploads hold memory and a graceful shutdown for less time; too low "
        "refuses big requests from slow links.",
    )
    max_inflight_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1024,
        description="Bound on request bytes being received or parsed at once, over all "
        "requests; a body that would pass it is refused with 429 before it is read. Bounds "
        "the memory that uploads can take before admission control sees a token.",
    )
    refusal_delay_s: float = Field(
        default=0.25,
        ge=0.0,
        description="A 429 is sent after this pause (the event loop waits, it does not work). "
        "Clients that ignore Retry-After and retry at once are then slowed to a few refusals "
        "a second per connection, instead of taking the CPU the model needs; polite clients "
        "wait Retry-After (at least 1 s) anyway.",
    )
    shutdown_delay_s: float = Field(
        default=5.0,
        ge=0.0,
        description="On SIGTERM, answer /readyz 503 for this long while still serving, so "
        "load balancers stop sending work before the listener closes; then drain. SIGINT "
        "skips it.",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Bearer keys, comma separated. When set, every route but the probes "
        "(/healthz, /readyz) and /metrics needs 'Authorization: Bearer <key>'.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Log level of the service and of uvicorn."
    )

    @field_validator("api_keys", "suffix_ids", "policy_tokenizers", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("objective_weights", mode="before")
    @classmethod
    def _weights_csv(cls, value: object) -> object:
        return _split_csv(value)

    @model_validator(mode="after")
    def _one_objective(self) -> Self:
        if self.objective is not None and self.objective_weights is not None:
            raise ValueError("give objective or objective_weights, not both")
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")

    @property
    def request_bytes_limit(self) -> int:
        """``max_request_bytes``, or what it is when unset (see its description)."""
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        return max(1 << 20, MAX_BYTES_PER_TOKEN_ID * self.max_queued_tokens)

    @model_validator(mode="after")
    def _keys_are_not_blank(self) -> Self:
        if any(len(key) < 8 for key in self.api_keys):
            raise ValueError("every API key must be at least 8 characters")
        return self
