"""Prometheus metrics, registered on an injected registry (never the global one).

Names follow Prometheus conventions: the ``tokenreward_`` prefix, ``_total`` counters,
``_seconds`` histograms with geometric buckets, power-of-two buckets for sizes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from tokenreward_service.batching import BatchStats
from tokenreward_service.model import ModelSpec

__all__ = ["Metrics"]

_LATENCY_BUCKETS = tuple(0.001 * 2**i for i in range(17))  # 1 ms .. 65 s
_SIZE_BUCKETS = tuple(float(2**i) for i in range(13))  # 1 .. 4096
_TOKEN_BUCKETS = tuple(float(2**i) for i in range(4, 21))  # 16 .. 1M


class Metrics:
    """Every metric the service exports; one instance per app, on its own registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "tokenreward_requests_total",
            "HTTP requests answered, by route and status code.",
            ["route", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "tokenreward_request_duration_seconds",
            "Time from request received to response ready, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.errors = Counter(
            "tokenreward_errors_total",
            "Error responses, by error type.",
            ["type"],
            registry=registry,
        )
        self.items = Counter(
            "tokenreward_items_total", "Items scored successfully.", registry=registry
        )
        self.queue_items = Gauge(
            "tokenreward_queue_items", "Items waiting for the model.", registry=registry
        )
        self.queue_tokens = Gauge(
            "tokenreward_queue_tokens", "Tokens waiting for the model.", registry=registry
        )
        self.batch_size = Histogram(
            "tokenreward_batch_size",
            "Items per forward pass.",
            buckets=_SIZE_BUCKETS,
            registry=registry,
        )
        self.batch_tokens = Histogram(
            "tokenreward_batch_padded_tokens",
            "Padded tokens (longest x count) per forward pass.",
            buckets=_TOKEN_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "tokenreward_tokens_total",
            "Tokens by kind: submitted (in the items), real (computed by the model, a shared "
            "prompt once), padded (positions computed, padding included). Padding efficiency "
            "is real / padded; shared-prompt savings are submitted / real.",
            ["kind"],
            registry=registry,
        )
        self.shared_items = Counter(
            "tokenreward_shared_prompt_items_total",
            "Items scored against a prompt computed once for their group (shared-prompt hits).",
            registry=registry,
        )
        self.queue_wait = Histogram(
            "tokenreward_queue_wait_seconds",
            "Time the oldest item of a batch waited before its forward pass.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference = Histogram(
            "tokenreward_inference_duration_seconds",
            "Time of one forward pass with its head and copy back.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.model_info = Info("tokenreward_model", "The loaded reward model.", registry=registry)

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        self.batch_tokens.observe(stats.padded_tokens)
        self.tokens.labels("submitted").inc(stats.submitted_tokens)
        self.tokens.labels("real").inc(stats.real_tokens)
        self.tokens.labels("padded").inc(stats.padded_tokens)
        self.shared_items.inc(stats.shared_items)
        self.queue_wait.observe(stats.queue_wait_s)
        self.inference.observe(stats.inference_s)

    def observe_queue(self, items: int, tokens: int) -> None:
        self.queue_items.set(items)
        self.queue_tokens.set(tokens)

    def set_model(self, spec: ModelSpec) -> None:
        self.model_info.info(
            {
                "id": spec.id,
                "revision": spec.revision,
                "architecture": spec.architecture,
                "dtype": spec.dtype,
                "device": spec.device,
                "random_weights": str(spec.random_weights).lower(),
            }
        )
