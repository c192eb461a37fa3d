"""Every bad request gets the one error shape, the right status and the offending item; the
server keeps answering good requests correctly afterwards."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.support import LiveServer
from tokenreward.protocol import ErrorResponse

GOOD = {"id": "ok", "prompt_ids": [5, 6, 7], "response_ids": [8, 9]}


def items(*bad: dict[str, Any], at: int = 1) -> list[dict[str, Any]]:
    good = [dict(GOOD, id=str(i)) for i in range(3)]
    return good[:at] + list(bad) + good[at:]


CASES: list[tuple[str, Any, int, str, int | None]] = [
    # name, body, status, type, item
    (
        "id too big",
        {"items": items({"prompt_ids": [1], "response_ids": [128]})},
        422,
        "invalid_request",
        1,
    ),
    (
        "negative id",
        {"items": items({"prompt_ids": [-1], "response_ids": [3]}, at=2)},
        422,
        "invalid_request",
        2,
    ),
    (
        "float id",
        {"items": items({"prompt_ids": [1], "response_ids": [3.0]})},
        422,
        "invalid_request",
        1,
    ),
    (
        "string id",
        {"items": items({"prompt_ids": ["1"], "response_ids": [3]})},
        422,
        "invalid_request",
        1,
    ),
    (
        "bool id",
        {"items": items({"prompt_ids": [True], "response_ids": [3]})},
        422,
        "invalid_request",
        1,
    ),
    (
        "huge id",
        {"items": items({"prompt_ids": [2**70], "response_ids": [3]})},
        422,
        "invalid_request",
        1,
    ),
    (
        "empty prompt",
        {"items": items({"prompt_ids": [], "response_ids": [3]}, at=0)},
        422,
        "invalid_request",
        0,
    ),
    (
        "empty response",
        {"items": items({"prompt_ids": [1], "response_ids": []})},
        422,
        "invalid_request",
        1,
    ),
    (
        "too long",
        {"items": items({"prompt_ids": [4] * 150, "response_ids": [4] * 51})},
        422,
        "invalid_request",
        1,
    ),
    ("beta above 1", {"items": items(), "beta_c": 1.5}, 422, "invalid_request", None),
    ("beta below 0", {"items": items(), "beta_c": -0.1}, 422, "invalid_request", None),
    ("beta as text", {"items": items(), "beta_c": "half"}, 422, "invalid_request", None),
    ("bad baseline", {"items": items(), "baseline": "mean"}, 422, "invalid_request", None),
    ("unknown field", {"items": items(), "temperature": 1}, 422, "invalid_request", None),
    ("unknown item field", {"items": items(dict(GOOD, extra=1))}, 422, "invalid_request", 1),
    ("missing ids", {"items": items({"prompt_ids": [1]})}, 422, "invalid_request", 1),
    ("no items", {"items": []}, 422, "invalid_request", None),
    ("not an object", [1, 2], 422, "invalid_request", None),
    ("too many items", {"items": [GOOD] * 65}, 413, "too_large", None),
]


@pytest.mark.parametrize(
    ("name", "body", "status", "error_type", "item"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_request(
    server: LiveServer, name: str, body: Any, status: int, error_type: str, item: int | None
) -> None:
    response = httpx.post(f"{server.url}/v1/rewards", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = ErrorResponse.model_validate(response.json()).error  # exactly the wire shape
    assert error.type.value == error_type
    assert error.item == item
    assert error.message
    _still_serves(server)


def test_body_that_is_not_json(server: LiveServer) -> None:
    response = httpx.post(f"{server.url}/v1/rewards", content=b"{items: [", timeout=30)
    assert response.status_code == 422
    assert response.json()["error"]["type"] == "invalid_request"
    _still_serves(server)


def test_body_over_the_byte_limit(server: LiveServer) -> None:
    body = {"items": [{"prompt_ids": [5] * 40000, "response_ids": [6]}]}
    response = httpx.post(f"{server.url}/v1/rewards", json=body, timeout=30)
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "too_large"
    _still_serves(server)


def test_unknown_route_and_method(server: LiveServer) -> None:
    missing = httpx.get(f"{server.url}/v2/rewards", timeout=30)
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found"
    wrong = httpx.get(f"{server.url}/v1/rewards", timeout=30)
    assert wrong.status_code == 405
    assert wrong.json()["error"]["type"] == "method_not_allowed"


def test_empty_prompt_is_fine_with_the_zero_baseline(server: LiveServer) -> None:
    body = {"items": [{"prompt_ids": [], "response_ids": [3, 4, 5]}], "baseline": "zero"}
    response = httpx.post(f"{server.url}/v1/rewards", json=body, timeout=30)
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["prompt_score"] is None
    assert sum(result["token_rewards"]) == pytest.approx(result["score"], abs=1e-6)


_baseline: dict[str, Any] = {}


def _still_serves(server: LiveServer) -> None:
    """A good request after the bad one answers 200 with the same numbers as before."""
    response = httpx.post(f"{server.url}/v1/rewards", json={"items": [GOOD]}, timeout=30)
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert len(result["token_rewards"]) == 2
    _baseline.setdefault("result", result)
    assert result == _baseline["result"]
