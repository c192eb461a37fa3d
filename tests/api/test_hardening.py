"""The server under hostile clients, over real sockets on 127.0.0.1: slow or idle connections
are closed, stalled uploads answered, the bytes in flight bounded, refusals cheap, shutdown
fails readiness first and exits 0. Every wait polls the state it waits for."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import orjson
import pytest

from tests.api.test_metrics_auth_overload import GatedModel
from tests.support import LiveServer, free_port
from tokenreward_service.bench.runner import spawn_server
from tokenreward_service.config import Settings
from tokenreward_service.model import RewardModel


def poll(condition: Callable[[], bool], timeout_s: float = 15.0) -> float:
    """Wait until ``condition()`` holds; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, "the state waited for never came"
        time.sleep(0.01)
    return time.monotonic() - started


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1 << 16) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def head(path: str, length: int, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(1 << 16)
        assert part, "closed without an answer"
        data += part
    top, _, rest = data.partition(b"\r\n\r\n")
    lines = top.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    size = int(headers.get("content-length", "0"))
    while len(rest) < size:
        part = sock.recv(1 << 16)
        assert part
        rest += part
    return int(lines[0].split()[1]), headers, rest


@pytest.fixture
def guarded(llama: RewardModel) -> Iterator[LiveServer]:
    settings = Settings(header_timeout_s=1.0, body_timeout_s=1.0, max_inflight_bytes=100_000)
    with LiveServer(settings, model=llama) as server:
        yield server


def test_slow_and_idle_connections_are_closed_and_others_are_served(guarded: LiveServer) -> None:
    """Before: 0 of 1,300 slowloris and idle connections closed in 45 s."""
    idle = [connect(guarded.url) for _ in range(20)]
    slow = [connect(guarded.url) for _ in range(20)]
    stop = threading.Event()

    def trickle() -> None:  # one header byte every 0.2 s on each slow connection
        for byte in b"POST /v1/rewards HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 200:
            for sock in slow:
                with contextlib.suppress(OSError):
                    sock.send(bytes([byte]))
            if stop.wait(0.2):
                return

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        body = {"items": [{"prompt_ids": [1], "response_ids": [2]}]}
        assert httpx.post(f"{guarded.url}/v1/rewards", json=body).status_code == 200
        took = poll(lambda: all(closed_by_server(s) for s in idle + slow), timeout_s=10)
        assert took < 5
    finally:
        stop.set()
        thread.join(5)
        for sock in idle + slow:
            sock.close()


def test_a_stalled_upload_is_answered_with_the_wire_shape(guarded: LiveServer) -> None:
    with connect(guarded.url) as sock:
        sock.sendall(head("/v1/rewards", 1000) + b'{"items": [')
        started = time.monotonic()
        status, _, body = read_response(sock)
    assert status == 504
    assert orjson.loads(body)["error"]["type"] == "timeout"
    assert "did not arrive within 1 s" in orjson.loads(body)["error"]["message"]
    assert time.monotonic() - started < 5


def test_bytes_in_flight_are_bounded_over_all_requests(guarded: LiveServer) -> None:
    """Before: 20 stalled 50 MB uploads added 1,050 MiB of RSS; nothing bounded the total."""
    state = guarded.app.state.tokenreward
    with connect(guarded.url) as first:
        first.sendall(head("/v1/rewards", 80_000) + b"{")
        poll(lambda: state.inflight.used == 80_000)
        with connect(guarded.url) as second:
            second.sendall(head("/v1/rewards", 50_000))
            status, headers, body = read_response(second)  # refused before its body is sent
        assert status == 429
        assert orjson.loads(body)["error"]["type"] == "overloaded"
        assert int(headers["retry-after"]) >= 1
    poll(lambda: state.inflight.used == 0)  # the first one went away: its share came back


def test_while_the_queue_is_full_a_big_body_is_refused_before_it_is_read(
    llama: RewardModel,
) -> None:
    """Before: every refusal read and parsed its whole body first (+2.3 ms per 182 KB), and
    a client sending only the head waited for its own timeout."""
    gated = GatedModel(llama)
    settings = Settings(max_queued_tokens=200, max_batch_size=1, max_wait_ms=0)
    with LiveServer(settings, model=gated) as server:  # type: ignore[arg-type]
        fill = {"items": [{"prompt_ids": [1] * 50, "response_ids": [2] * 50}] * 2}
        sender = threading.Thread(
            target=lambda: httpx.post(f"{server.url}/v1/rewards", json=fill, timeout=60)
        )
        sender.start()
        state = server.app.state.tokenreward
        poll(lambda: state.queue_free() == 100)  # one item held in the forward pass, one queued
        try:
            with connect(server.url) as sock:
                # The head only, of a body that holds at least 171 tokens: more than the 100 free.
                sock.sendall(head("/v1/rewards", 3000))
                status, headers, body = read_response(sock)
            assert status == 429
            assert "queue full" in orjson.loads(body)["error"]["message"]
            assert int(headers["retry-after"]) >= 1
        finally:
            gated.gate.set()
            sender.join(30)


def test_a_client_that_hangs_up_mid_upload_is_not_a_server_error(guarded: LiveServer) -> None:
    """Before: counted as HTTP 500 with a traceback (false alerts)."""
    with connect(guarded.url) as sock:
        sock.sendall(head("/v1/rewards", 5000) + b'{"items": [')

    def counted() -> dict[str, float]:
        text = httpx.get(f"{guarded.url}/metrics").text
        out = {}
        for line in text.splitlines():
            if line.startswith('tokenreward_requests_total{route="/v1/rewards"'):
                status = line.split('status="')[1].split('"')[0]
                out[status] = float(line.rsplit(" ", 1)[1])
        return out

    poll(lambda: counted().get("499", 0) >= 1)
    assert "500" not in counted()


def test_sigterm_fails_readiness_first_serves_on_then_exits_0(tmp_path: object) -> None:
    """Before: /readyz never answered 503 (the listener closed first) and the process died by
    signal 15 even after a clean drain."""
    body = {"items": [{"prompt": "a", "response": "good"}]}
    with spawn_server(["--shutdown-delay-s", "3"]) as server:
        assert httpx.get(f"{server.url}/readyz").status_code == 200
        server.process.send_signal(signal.SIGTERM)
        poll(lambda: httpx.get(f"{server.url}/readyz").status_code == 503, timeout_s=3)
        # Still serving while load balancers take it out.
        assert httpx.post(f"{server.url}/v1/rewards", json=body).status_code == 200
        assert server.process.wait(30) == 0


def test_a_stalled_upload_cannot_hold_the_shutdown_for_the_request_timeout() -> None:
    """Before: one stalled upload held the exit for the whole request timeout (120 s)."""
    args = ["--shutdown-delay-s", "0", "--body-timeout-s", "2", "--request-timeout-s", "120"]
    with spawn_server(args) as server, connect(server.url) as sock:
        sock.sendall(head("/v1/rewards", 10_000) + b'{"items": [')
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0
        assert time.monotonic() - started < 10


def test_two_framings_for_one_body_are_refused() -> None:
    """Before: Content-Length together with chunked encoding was accepted."""
    with spawn_server([]) as server, connect(server.url) as sock:
        sock.sendall(head("/v1/rewards", 5, "Transfer-Encoding: chunked\r\n") + b"0\r\n\r\n")
        status, _, body = read_response(sock)
    assert status == 422
    assert "Transfer-Encoding" in orjson.loads(body)["error"]["message"]


def test_a_short_api_key_is_refused_without_printing_the_keys() -> None:
    secret = "the-real-secret-key-0123"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokenreward_service.cli",
            "serve",
            "--port",
            str(free_port()),
            "--api-keys",
            f"{secret},short",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "at least 8 characters" in proc.stderr
    assert secret not in proc.stderr + proc.stdout


def test_the_default_bind_is_this_machine_only() -> None:
    from tokenreward_service.app import create_app
    from tokenreward_service.server import build_server

    assert Settings().host == "127.0.0.1"
    assert build_server(Settings(), create_app(Settings())).config.host == "127.0.0.1"


def test_the_listener_answers_while_the_model_loads(
    llama: RewardModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the model loaded before the listener bound, so a start-up probe saw connection
    refused for as long as a large model took to load."""
    import tokenreward_service.app as app_module

    gate = threading.Event()

    def slow_load(settings: Settings) -> RewardModel:
        assert gate.wait(30)
        return llama

    monkeypatch.setattr(app_module, "load_model", slow_load)
    with LiveServer(Settings()) as server:  # no model given: it loads behind the listener
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        loading = httpx.get(f"{server.url}/readyz")
        assert loading.status_code == 503
        assert "not loaded yet" in loading.json()["error"]["message"]
        gate.set()
        poll(lambda: httpx.get(f"{server.url}/readyz").status_code == 200)


def test_a_model_that_fails_to_load_says_why_on_readyz(monkeypatch: pytest.MonkeyPatch) -> None:
    import tokenreward_service.app as app_module
    from tokenreward_service.errors import ModelLoadError

    def broken(settings: Settings) -> RewardModel:
        raise ModelLoadError("no linear 'score' head")

    monkeypatch.setattr(app_module, "load_model", broken)
    with LiveServer(Settings()) as server:
        poll(lambda: "score" in httpx.get(f"{server.url}/readyz").text)
        assert httpx.get(f"{server.url}/readyz").status_code == 503


def test_a_load_generator_waits_for_a_loading_server(
    llama: RewardModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tokenreward bench --url` started beside a server that is still loading its model (as
    the compose stack's load generator is) waits for readiness instead of failing."""
    import tokenreward_service.app as app_module
    from tokenreward_service.bench import _model_info_when_ready

    gate = threading.Event()

    def slow_load(settings: Settings) -> RewardModel:
        assert gate.wait(30)
        return llama

    monkeypatch.setattr(app_module, "load_model", slow_load)
    with LiveServer(Settings()) as server:
        found: list[dict[str, object]] = []
        waiter = threading.Thread(
            target=lambda: found.append(_model_info_when_ready(server.url, None, timeout_s=60))
        )
        waiter.start()
        assert httpx.get(f"{server.url}/readyz").status_code == 503
        gate.set()
        waiter.join(60)
    assert found[0]["vocab_size"] == llama.spec.vocab_size


def test_small_requests_are_handled_on_the_loop_and_big_ones_on_worker_threads(
    llama: RewardModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Handing work to a thread costs the event loop about a millisecond under load, more than
    parsing and preparing a small request; a big one (or a tokenizer's work) still leaves the
    loop, so it cannot stall the probes and the other requests."""
    from tokenreward_service import routes
    from tokenreward_service.conversations import Preparer
    from tokenreward_service.serving import INLINE_BODY_BYTES, INLINE_TOKENS

    where: list[tuple[str, bool]] = []
    parse, prepare = routes.parse_reward_request, Preparer.prepare

    def on_thread() -> bool:
        return threading.current_thread().name.startswith("asyncio_")

    def parse_where(*args: object, **kwargs: object) -> object:
        where.append(("parse", on_thread()))
        return parse(*args, **kwargs)  # type: ignore[arg-type]

    def prepare_where(self: Preparer, request: object) -> object:
        where.append(("prepare", on_thread()))
        return prepare(self, request)  # type: ignore[arg-type]

    monkeypatch.setattr(routes, "parse_reward_request", parse_where)
    monkeypatch.setattr(Preparer, "prepare", prepare_where)

    def items(count: int, length: int) -> list[dict[str, list[int]]]:
        ids = [(i * 7) % 90 + 3 for i in range(length)]
        return [{"prompt_ids": ids, "response_ids": ids} for _ in range(count)]

    small = {"items": items(8, 60)}
    big = {"items": items(1000, 60)}  # 120,000 token IDs, about 380 KB of JSON
    assert len(orjson.dumps(small)) <= INLINE_BODY_BYTES < len(orjson.dumps(big))
    assert 8 * 120 <= INLINE_TOKENS < 1000 * 120
    with LiveServer(Settings(), model=llama) as server:
        for body, count in ((small, 8), (big, 1000)):
            answer = httpx.post(f"{server.url}/v1/rewards", json=body, timeout=120)
            assert answer.status_code == 200, answer.text
            assert len(answer.json()["results"]) == count
    assert where == [("parse", False), ("prepare", False), ("parse", True), ("prepare", True)]
