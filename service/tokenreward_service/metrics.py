"""Prometheus metrics, registered on an injected registry (never the global one).

Names follow Prometheus conventions: the ``tokenreward_`` prefix, ``_total`` counters,
``_seconds`` histograms with geometric buckets, power-of-two buckets for sizes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from tokenreward_service.batching import BatchStats
from tokenreward_service.model import ModelSpec
from tokenreward_service.serving import ResultObserver

__all__ = ["Metrics"]

_LATENCY_BUCKETS = tuple(0.001 * 2**i for i in range(17))  # 1 ms .. 65 s
_SIZE_BUCKETS = tuple(float(2**i) for i in range(13))  # 1 .. 4096
_TOKEN_BUCKETS = tuple(float(2**i) for i in range(4, 21))  # 16 .. 1M
_POSITIVE = tuple(0.125 * 2**i for i in range(8))  # 0.125 .. 16
_SCORE_BUCKETS = (*(-b for b in reversed(_POSITIVE)), 0.0, *_POSITIVE)
"""Symmetric around 0: reward-model scores are logits of either sign."""
_REWARD_BUCKETS = tuple(1e-4 * 4**i for i in range(9))  # 1e-4 .. 6.6


class TensorHistogram(Collector):
    """A Prometheus histogram fed whole tensors at once (one ``searchsorted`` per call).

    prometheus-client observes one value per call; token rewards come thousands per request,
    so they are counted in one vectorised pass and exported as an ordinary histogram. The pass
    is NumPy's, single-threaded: ``torch.bucketize`` splits even a few thousand values over the
    intra-op threads, and when the cores are busy (the forward pass, the clients) its threads
    wait on each other for milliseconds, on the event loop of every request.
    """

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self.counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # last: above every bound
        self.total = 0.0
        self._lock = threading.Lock()

    def observe_tensor(self, values: torch.Tensor) -> None:
        array = values.detach().cpu().numpy().astype(np.float64, copy=False).ravel()
        array = array[np.isfinite(array)]
        if array.size == 0:
            return
        # side="left": a value equal to a bound falls in that bound's bucket (le="bound").
        counts = np.bincount(
            np.searchsorted(self.bounds, array, side="left"), minlength=len(self.counts)
        )
        with self._lock:
            self.counts += counts
            self.total += float(array.sum())

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            cumulative = np.cumsum(self.counts).tolist()
            total = self.total
        bounds = [*map(str, self.bounds.tolist()), "+Inf"]
        yield HistogramMetricFamily(
            self.name,
            self.documentation,
            buckets=list(zip(bounds, map(float, cumulative), strict=True)),
            sum_value=total,
        )


GpuMemory = tuple[float, float, float]
"""Allocated, reserved and peak allocated bytes of a CUDA device."""


def cuda_memory(device: torch.device) -> GpuMemory:
    """What :data:`GpuMemory` says, read from ``device`` (in this process)."""
    return (
        float(torch.cuda.memory_allocated(device)),
        float(torch.cuda.memory_reserved(device)),
        float(torch.cuda.max_memory_allocated(device)),
    )


class _GpuMemory(Collector):
    """Allocated, reserved and peak allocated CUDA memory of the serving device, read at
    scrape time (from the device in this process, or as the engine process last reported)."""

    def __init__(self, read: Callable[[], GpuMemory]) -> None:
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "tokenreward_gpu_memory_bytes", "CUDA memory of the serving device.", labels=["kind"]
        )
        allocated, reserved, peak = self.read()
        family.add_metric(["allocated"], allocated)
        family.add_metric(["reserved"], reserved)
        family.add_metric(["peak_allocated"], peak)
        yield family


class Metrics(ResultObserver):
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
        self.oom_splits = Counter(
            "tokenreward_oom_splits_total",
            "Batches split in two and retried after running out of device memory.",
            registry=registry,
        )
        self.batch_budget = Gauge(
            "tokenreward_batch_token_budget",
            "Padded-token budget per forward pass in force (halved after running out of "
            "device memory).",
            registry=registry,
        )
        self.scheduler_up = Gauge(
            "tokenreward_scheduler_up",
            "1 while the batch scheduler runs; 0 once it has failed (the process then fails "
            "liveness and must be restarted).",
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
        self.scores = TensorHistogram(
            "tokenreward_score", "Holistic sequence scores R(x, y) returned.", _SCORE_BUCKETS
        )
        self.prompt_scores = TensorHistogram(
            "tokenreward_prompt_score",
            "Prompt scores R(x, ∅) returned (the baseline of the dense rewards).",
            _SCORE_BUCKETS,
        )
        self.token_rewards = TensorHistogram(
            "tokenreward_token_reward_abs",
            "Magnitude |r_t| of the token rewards returned.",
            _REWARD_BUCKETS,
        )
        for histogram in (self.scores, self.prompt_scores, self.token_rewards):
            registry.register(histogram)
        self.nonfinite = Counter(
            "tokenreward_nonfinite_outputs_total",
            "Items whose score or rewards came out NaN or infinite (answered 500, never sent).",
            registry=registry,
        )
        self.rejected_items = Counter(
            "tokenreward_rejected_items_total",
            "Items of requests refused after parsing, by reason (the error type).",
            ["reason"],
            registry=registry,
        )
        ProcessCollector(registry=registry)  # process_resident_memory_bytes, cpu seconds, ...

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        self.batch_tokens.observe(stats.padded_tokens)
        self.tokens.labels("submitted").inc(stats.submitted_tokens)
        self.tokens.labels("real").inc(stats.real_tokens)
        self.tokens.labels("padded").inc(stats.padded_tokens)
        self.shared_items.inc(stats.shared_items)
        self.oom_splits.inc(stats.oom_splits)
        self.queue_wait.observe(stats.queue_wait_s)
        self.inference.observe(stats.inference_s)

    def observe_queue(self, items: int, tokens: int) -> None:
        self.queue_items.set(items)
        self.queue_tokens.set(tokens)

    def observe_results(
        self, scores: torch.Tensor, prompt_scores: torch.Tensor, rewards: torch.Tensor
    ) -> None:
        """Distributions of what one request returned (1-D tensors of any length)."""
        self.scores.observe_tensor(scores)
        self.prompt_scores.observe_tensor(prompt_scores[~torch.isnan(prompt_scores)])
        self.token_rewards.observe_tensor(rewards.abs())

    def observe_nonfinite(self, items: int) -> None:
        self.nonfinite.inc(items)

    def watch_gpu(self, device: torch.device) -> None:
        if device.type == "cuda":
            self.watch_gpu_memory(lambda: cuda_memory(device))

    def watch_gpu_memory(self, read: Callable[[], GpuMemory]) -> None:
        """Export the CUDA memory that ``read`` gives: (allocated, reserved, peak)."""
        self.registry.register(_GpuMemory(read))

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
