"""Composition root: builds the app from Settings; the model loads in the lifespan."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from tokenreward_service.batching import Batcher, BatcherConfig
from tokenreward_service.config import Settings
from tokenreward_service.conversations import Preparer, load_policy_tokenizers
from tokenreward_service.engine import EngineModel, EngineProcess
from tokenreward_service.errors import ModelLoadError
from tokenreward_service.loading import load_reward_model, resolve_device
from tokenreward_service.metrics import Metrics
from tokenreward_service.model import RewardModel, host_threads
from tokenreward_service.routes import (
    AdmissionMiddleware,
    AppState,
    MetricsMiddleware,
    build_router,
    install_error_handlers,
)
from tokenreward_service.serving import RewardService
from tokenreward_service.tokentext import TokenText

__all__ = [
    "batcher_config",
    "create_app",
    "engine_process",
    "host_threads",
    "load_model",
    "load_preparer",
]

log = logging.getLogger(__name__)

DEMO_MODEL = Path(__file__).resolve().parent / "demo" / "model"
"""The embedded default: a sentiment RM trained by ``python -m tokenreward_service.demo.train``."""
RANDOM_MODEL_ID = "random-tiny-llama (RANDOM WEIGHTS: not a trained model)"


def load_model(settings: Settings) -> RewardModel:
    """The model named by the settings or, with none named, the embedded default."""
    common = {
        "device": settings.device,
        "dtype": settings.dtype,
        "max_length": settings.max_length,
        "suffix_ids": settings.suffix_ids,
        "share_prompts": settings.share_prompts,
    }
    formats = {
        "objective": settings.objective,
        "objective_weights": settings.objective_weights,
        "normalize_reward": settings.normalize_reward,
        "trust_remote_code": settings.trust_remote_code,
        "adapter": settings.adapter,
    }
    if settings.model is not None:
        return load_reward_model(settings.model, **common, **formats)  # type: ignore[arg-type]
    if (DEMO_MODEL / "config.json").is_file():
        log.info("no --model given: serving the embedded demo sentiment RM (%s)", DEMO_MODEL)
        return load_reward_model(DEMO_MODEL, **common)  # type: ignore[arg-type]
    from tokenreward_service.tiny import save_tiny_reward_model

    log.warning(
        "no --model given and no trained default is embedded: serving a tiny Llama reward model "
        "with RANDOM WEIGHTS; its rewards mean nothing. Pass --model PATH to serve a real one."
    )
    with tempfile.TemporaryDirectory(prefix="tokenreward-random-") as folder:
        save_tiny_reward_model(
            folder, "llama", vocab_size=32000, hidden_size=64, max_positions=4096
        )
        return load_reward_model(
            folder,
            model_id=RANDOM_MODEL_ID,
            random_weights=True,
            **common,  # type: ignore[arg-type]
        )


def load_preparer(settings: Settings, model: RewardModel | EngineModel) -> Preparer:
    """What turns items into the model's token sequences: the RM's tokenizer, the chat
    template (the settings' file, else the tokenizer's own) and the policy tokenizers."""
    template = None
    if settings.chat_template is not None:
        path = Path(settings.chat_template)
        if not path.is_file():
            raise ModelLoadError(f"chat template file {path} does not exist")
        template = path.read_text(encoding="utf-8")
    tokenizer = getattr(model, "tokenizer", None)
    if template is not None and tokenizer is None:
        raise ModelLoadError("a chat template was given, but the model has no tokenizer")
    return Preparer(
        vocab_size=model.spec.vocab_size,
        suffix_ids=model.spec.suffix_ids,
        rm=None if tokenizer is None else TokenText(tokenizer, "rm"),
        chat_template=template,
        policies=load_policy_tokenizers(settings.policy_tokenizers),
    )


def batcher_config(settings: Settings) -> BatcherConfig:
    """The scheduler's settings, as the server runs them."""
    return BatcherConfig(
        max_batch_tokens=settings.max_batch_tokens,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_ms / 1000.0,
        max_queued_tokens=settings.max_queued_tokens,
        cross_request=settings.batching == "on",
        min_padding_efficiency=settings.min_padding_efficiency,
        group_prompts=settings.share_prompts,
    )


def engine_process(settings: Settings) -> bool:
    """Whether the server runs its model in an engine process (:mod:`.engine`): ``auto`` is
    on when the model runs on an accelerator, where the host path decides the throughput,
    and off on the CPU, where the forward pass dominates and a process more only costs
    memory."""
    if settings.engine_process != "auto":
        return settings.engine_process == "on"
    try:
        return resolve_device(settings.device).type != "cpu"
    except ModelLoadError:
        return False  # the load itself reports the unusable device


def create_app(
    settings: Settings,
    *,
    model: RewardModel | None = None,
    registry: CollectorRegistry | None = None,
    preparer: Preparer | None = None,
    on_load_failure: Callable[[BaseException], None] | None = None,
    engine_factory: Callable[[], RewardModel] | None = None,
) -> FastAPI:
    """Build the app. ``model`` is served as loaded (the loading settings, such as ``model``,
    ``device`` or ``max_length``, are then unused); ``preparer`` likewise (the chat template
    and policy tokenizer settings are then unused); ``registry`` receives the metrics (a fresh
    one by default, never the process-global one).

    Without ``model`` the model loads in the background after the server starts listening, so
    that probes get answers while a large model loads (``/healthz`` 200, ``/readyz`` 503); a
    failure is reported to ``on_load_failure`` (the CLI exits 1) and by ``/readyz``.

    With :func:`engine_process` on (and no ``model`` given), the batcher and the model run in
    a child process that loads it with ``engine_factory`` (a picklable callable; by default
    :func:`load_model` with these settings), and this process keeps the HTTP edge.
    """
    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    state = AppState(
        metrics=metrics,
        api_keys=list(settings.api_keys),
        max_items=settings.max_items_per_request,
        max_bytes=settings.request_bytes_limit,
        body_timeout_s=settings.body_timeout_s,
        max_inflight_bytes=settings.max_inflight_bytes,
        refusal_delay_s=settings.refusal_delay_s,
        max_queued_tokens=settings.max_queued_tokens,
    )
    batchers: list[Batcher | EngineProcess] = []

    async def start() -> None:
        loaded: RewardModel | EngineModel
        scheduler: Batcher | EngineProcess
        if model is None and engine_process(settings):
            engine = EngineProcess(
                engine_factory or functools.partial(load_model, settings),
                batcher_config(settings),
                on_batch=metrics.observe_batch,
                on_queue=metrics.observe_queue,
            )
            batchers.append(engine)
            loaded = await engine.start()
            scheduler = engine
            if loaded.spec.device.startswith("cuda"):
                metrics.watch_gpu_memory(lambda: engine.gpu_memory)
        else:
            loaded = model if model is not None else await asyncio.to_thread(load_model, settings)
            metrics.watch_gpu(torch.device(loaded.spec.device))
            scheduler = Batcher(
                loaded,
                batcher_config(settings),
                on_batch=metrics.observe_batch,
                on_queue=metrics.observe_queue,
            )
            await scheduler.start()
            batchers.append(scheduler)
        items = preparer or await asyncio.to_thread(load_preparer, settings, loaded)
        metrics.set_model(loaded.spec)
        host_threads(loaded.spec)
        batcher = scheduler
        metrics.batch_budget.set_function(lambda: batcher.batch_token_budget)
        metrics.scheduler_up.set_function(lambda: 0.0 if batcher.failed else 1.0)
        state.batcher_alive = lambda: batcher.alive
        state.batcher_failed = lambda: batcher.failed
        state.queue_free = lambda: batcher.free_tokens
        state.retry_after = batcher.retry_after
        state.batcher_budget = lambda: batcher.batch_token_budget
        state.service = RewardService(
            loaded.spec,
            batcher,
            timeout_s=settings.request_timeout_s,
            preparer=items,
            observer=metrics,
        )
        # The model's objects live as long as the process: keep them out of the collector's
        # full passes, which otherwise pause everything (probes included) for ~0.2 s.
        gc.collect()
        gc.freeze()
        state.ready = True

    def loaded(task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        assert error is not None
        state.load_error = str(error)
        log.error("the model could not be loaded: %s", error)
        if on_load_failure is not None:
            on_load_failure(error)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loading: asyncio.Task[None] | None = None
        if model is not None:
            await start()  # already in memory: ready before the listener opens
        else:
            loading = asyncio.create_task(start(), name="tokenreward-load")
            loading.add_done_callback(loaded)
        try:
            yield
        finally:
            state.ready = False  # draining: /readyz answers 503 while queued work finishes
            if loading is not None and not loading.done():
                loading.cancel()
            for batcher in batchers:
                await batcher.stop()

    app = FastAPI(
        title="tokenreward",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.include_router(build_router(state))
    install_error_handlers(app, refusal_delay_s=settings.refusal_delay_s)
    app.add_middleware(AdmissionMiddleware, state=state)  # inside the metrics: refusals count
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.state.tokenreward = state
    return app
