"""Metrics move with traffic; API keys guard what they should; overload answers 429 at once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.support import LiveServer
from tokenreward_service.config import Settings
from tokenreward_service.loading import load_reward_model
from tokenreward_service.model import BatchScores, RewardModel


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_move_after_traffic(server: LiveServer) -> None:
    before = _samples(httpx.get(f"{server.url}/metrics").text)
    body = {"items": [{"prompt_ids": [1, 2, 3], "response_ids": [4, 5, 6, 7]}] * 3}
    assert httpx.post(f"{server.url}/v1/rewards", json=body).status_code == 200
    assert httpx.post(f"{server.url}/v1/rewards", json={"items": []}).status_code == 422
    after = _samples(httpx.get(f"{server.url}/metrics").text)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("tokenreward_requests_total", route="/v1/rewards", status="200") == 1
    assert delta("tokenreward_requests_total", route="/v1/rewards", status="422") == 1
    assert delta("tokenreward_request_duration_seconds_count", route="/v1/rewards") == 2
    assert delta("tokenreward_errors_total", type="invalid_request") == 1
    assert delta("tokenreward_items_total") == 3
    assert delta("tokenreward_tokens_total", kind="submitted") == 21
    assert delta("tokenreward_tokens_total", kind="real") == 21  # prompt too short to share
    assert delta("tokenreward_tokens_total", kind="padded") >= 21
    assert delta("tokenreward_batch_size_count") >= 1
    assert delta("tokenreward_batch_size_sum") == 3
    assert delta("tokenreward_inference_duration_seconds_count") >= 1
    # Score histograms have negative buckets, so (per OpenMetrics) no _sum/_count: count +Inf.
    assert delta("tokenreward_prompt_score_bucket", le="+Inf") == 3
    assert delta("tokenreward_token_reward_abs_count") == 12  # 3 items x 4 response tokens
    assert delta("tokenreward_score_bucket", le="+Inf") == 3
    assert delta("tokenreward_rejected_items_total", reason="invalid_request") == 0  # parse error
    assert ("process_resident_memory_bytes", ()) in after
    assert ("tokenreward_queue_items", ()) in after
    assert ("tokenreward_queue_tokens", ()) in after
    info = [k for k in after if k[0] == "tokenreward_model_info"]
    assert len(info) == 1
    assert ("random_weights", "false") in info[0][1]


UNGUARDED = {"/healthz", "/readyz", "/metrics"}
"""The probes (which carry no key) and the metrics scrape."""


def _flat_routes(routes: Sequence[Any]) -> list[Any]:
    """The app's routes, routers included (FastAPI keeps an included router as one entry)."""
    out = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        out.extend(_flat_routes(inner.routes) if inner is not None else [route])
    return out


def test_api_keys_guard_every_route_but_the_probes_and_metrics(llama: RewardModel) -> None:
    key = "s3cret-key-123"
    with LiveServer(Settings(api_keys=[key, "another-key-456"]), model=llama) as server:
        body = {"items": [{"prompt_ids": [1], "response_ids": [2]}]}
        bodies = {"/get_reward": {"query": [], "prompts": []}}  # OpenRLHF's shape
        # Every route the app has, so that a new route without the guard fails this test.
        routes = [
            (method, route.path)
            for route in _flat_routes(server.app.routes)
            for method in sorted(route.methods or ())
            if method != "HEAD"
        ]
        assert {path for _, path in routes} >= {"/v1/rewards", "/v1/model", *UNGUARDED}
        for method, path in routes:
            if path in UNGUARDED:
                assert httpx.request(method, server.url + path).status_code == 200, path
                continue
            for headers in [{}, {"Authorization": "Bearer wrong-key-0000"}, {"Authorization": key}]:
                response = httpx.request(method, server.url + path, json=body, headers=headers)
                assert response.status_code == 401, (path, headers)
                assert response.json()["error"]["type"] == "unauthorized"
                assert response.headers["www-authenticate"] == "Bearer"
            for good in (key, "another-key-456"):
                ok = httpx.request(
                    method,
                    server.url + path,
                    json=bodies.get(path, body),
                    headers={"Authorization": f"Bearer {good}"},
                )
                assert ok.status_code == 200, (path, ok.text)


class GatedModel:
    """The real model, held at the start of each forward pass until the test opens the gate, so
    that the queue fills deterministically (a tiny model's forward is too quick to race)."""

    def __init__(self, model: RewardModel) -> None:
        self.model = model
        self.spec = model.spec
        self.gate = threading.Event()
        self.seen: list[int] = []  # lengths of the sequences that reached the model
        self.entered = 0  # forward passes begun (held at the gate or not)

    def score_batch(
        self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]
    ) -> BatchScores:
        self.entered += 1
        assert self.gate.wait(30)
        self.seen.extend(len(s) for s in sequences)
        return self.model.score_batch(sequences, prompt_lens)


async def until(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    """Poll the server state a test waits for (never a fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the state waited for never came"
        await asyncio.sleep(0.005)


def test_overload_answers_429_with_retry_after_and_recovers(llama: RewardModel) -> None:
    gated = GatedModel(llama)
    settings = Settings(max_queued_tokens=100, max_batch_size=1, max_wait_ms=0)
    item = {"prompt_ids": [1] * 20, "response_ids": [2] * 20}  # 40 tokens
    with LiveServer(settings, model=gated) as server:  # type: ignore[arg-type]

        async def scenario() -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                first = asyncio.ensure_future(
                    client.post("/v1/rewards", json={"items": [item, item]})
                )
                state = server.app.state.tokenreward
                # One item in the (held) forward pass, one queued: 60 tokens left.
                await until(lambda: gated.entered == 1 and state.queue_free() == 60)
                refused = await client.post("/v1/rewards", json={"items": [item, item]})
                assert refused.status_code == 429
                assert refused.json()["error"]["type"] == "overloaded"
                assert int(refused.headers["retry-after"]) >= 1
                too_big = await client.post("/v1/rewards", json={"items": [item, item, item]})
                assert too_big.status_code == 413  # could never fit: retrying would not help
                gated.gate.set()
                assert (await first).status_code == 200
                again = await client.post("/v1/rewards", json={"items": [item, item]})
                assert again.status_code == 200

        asyncio.run(scenario())


def test_readyz_and_model_info(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    info = httpx.get(f"{server.url}/v1/model").json()
    assert info["architecture"] == "LlamaForSequenceClassification"
    assert info["vocab_size"] == 128
    assert info["max_length"] == 200
    assert info["dtype"] == "float32"
    assert info["device"] == "cpu"
    assert info["random_weights"] is False
    assert info["revision"].startswith("sha256:")


@pytest.mark.parametrize("chunked", [True, False])
def test_body_limit_holds_without_content_length(server: LiveServer, chunked: bool) -> None:
    payload = b'{"items": [{"prompt_ids": [' + b"5," * 40000 + b'5], "response_ids": [6]}]}'
    content = (
        iter([payload[i : i + 4096] for i in range(0, len(payload), 4096)]) if chunked else payload
    )
    response = httpx.post(f"{server.url}/v1/rewards", content=content)
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "too_large"


def test_work_past_its_deadline_answers_504(llama: RewardModel) -> None:
    gated = GatedModel(llama)
    settings = Settings(max_batch_size=1, max_wait_ms=0, request_timeout_s=0.5)
    with LiveServer(settings, model=gated) as server:  # type: ignore[arg-type]
        body = {"items": [{"prompt_ids": [1, 2], "response_ids": [3]}]}
        late = httpx.post(f"{server.url}/v1/rewards", json=body, timeout=60)  # held past deadline
        assert late.status_code == 504
        assert late.json()["error"]["type"] == "timeout"
        gated.gate.set()
        assert httpx.post(f"{server.url}/v1/rewards", json=body, timeout=60).status_code == 200


def test_a_vanished_client_s_queued_items_never_run(llama: RewardModel) -> None:
    gated = GatedModel(llama)
    settings = Settings(max_batch_size=1, max_wait_ms=0, request_timeout_s=60)
    with LiveServer(settings, model=gated) as server:  # type: ignore[arg-type]

        async def scenario() -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                busy = asyncio.ensure_future(
                    client.post(
                        "/v1/rewards", json={"items": [{"prompt_ids": [1], "response_ids": [3]}]}
                    )
                )
                await until(lambda: gated.entered == 1)  # its item is in the held forward pass
                async with httpx.AsyncClient(base_url=server.url, timeout=0.3) as impatient:
                    body = {
                        "items": [{"prompt_ids": [1] * 7, "response_ids": [3] * 7}]
                    }  # 14 tokens
                    with pytest.raises(httpx.ReadTimeout):
                        await impatient.post("/v1/rewards", json=body)  # then hangs up
                state = server.app.state.tokenreward
                await until(lambda: state.queue_free() == settings.max_queued_tokens)  # dropped
                gated.gate.set()
                assert (await busy).status_code == 200
                ok = await client.post(
                    "/v1/rewards", json={"items": [{"prompt_ids": [1], "response_ids": [2]}]}
                )
                assert ok.status_code == 200

        asyncio.run(scenario())
    assert gated.seen == [2, 2]  # the 14-token item was dropped when its client went away


def test_nonfinite_outputs_are_refused_and_counted(llama_dir: Path) -> None:
    model = load_reward_model(llama_dir, device="cpu")
    with torch.no_grad():
        model._model.base_model.norm.weight[0] = float("nan")  # a broken checkpoint
    with LiveServer(Settings(), model=model) as server:
        body = {"items": [{"prompt_ids": [1, 2], "response_ids": [3, 4]}] * 2}
        response = httpx.post(f"{server.url}/v1/rewards", json=body)
        metrics = _samples(httpx.get(f"{server.url}/metrics").text)
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "internal"
    assert response.json()["error"]["item"] == 0
    assert metrics[("tokenreward_nonfinite_outputs_total", ())] == 2
    assert metrics[("tokenreward_rejected_items_total", (("reason", "internal"),))] == 2


def test_rejected_items_are_counted_by_reason(server: LiveServer) -> None:
    before = _samples(httpx.get(f"{server.url}/metrics").text)
    body = {
        "items": [
            {"prompt_ids": [1], "response_ids": [3]},
            {"prompt_ids": [1], "response_ids": [999]},
        ]
    }
    assert httpx.post(f"{server.url}/v1/rewards", json=body).status_code == 422
    after = _samples(httpx.get(f"{server.url}/metrics").text)
    key = ("tokenreward_rejected_items_total", (("reason", "invalid_request"),))
    assert after[key] - before.get(key, 0.0) == 2


class DyingModel:
    """The real model's spec, but a forward pass that answers with nothing the scheduler can
    read, so the scheduler itself dies with the batch in flight."""

    def __init__(self, model: RewardModel) -> None:
        self.spec = model.spec

    def score_batch(
        self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]
    ) -> BatchScores:
        return BatchScores(None, 0, 0, 0)  # type: ignore[arg-type]


def test_a_dead_scheduler_answers_its_callers_and_fails_liveness(llama: RewardModel) -> None:
    """Before: the caller waited for its deadline, /healthz stayed 200 and nothing said why."""
    settings = Settings(request_timeout_s=60)
    with LiveServer(settings, model=DyingModel(llama)) as server:  # type: ignore[arg-type]
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        answer = httpx.post(
            f"{server.url}/v1/rewards",
            json={"items": [{"prompt_ids": [1], "response_ids": [2]}]},
            timeout=30,  # well below the request's own 60 s deadline
        )
        # The request did nothing wrong: 503 not_ready, which clients retry elsewhere.
        assert answer.status_code == 503
        assert answer.json()["error"]["type"] == "not_ready"
        assert "scheduler failed" in answer.json()["error"]["message"]
        health = httpx.get(f"{server.url}/healthz")
        assert health.status_code == 500
        assert health.json()["error"]["type"] == "internal"
        assert httpx.get(f"{server.url}/readyz").status_code == 503
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "tokenreward_scheduler_up 0.0" in metrics
