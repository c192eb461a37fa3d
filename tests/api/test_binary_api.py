"""``POST /v1/rewards`` in the binary encoding (tokenreward.binary), negotiated by Content-Type
and Accept over real HTTP: the same results as JSON, the same limits, the same error shape."""

from __future__ import annotations

import random

import httpx
import pytest

from tests.support import LiveServer
from tokenreward import binary
from tokenreward.protocol import RewardItem, RewardRequest, RewardResponse

BIN = binary.MEDIA_TYPE


def _request(seed: int, n: int = 12, **options: object) -> RewardRequest:
    rng = random.Random(seed)
    items = [
        RewardItem(
            id=f"i{i}",
            prompt_ids=[rng.randrange(3, 128) for _ in range(rng.randint(1, 20))],
            response_ids=[rng.randrange(3, 128) for _ in range(rng.randint(1, 20))],
        )
        for i in range(n)
    ]
    return RewardRequest(items=items, **options)  # type: ignore[arg-type]


def _post(server: LiveServer, body: bytes, content_type: str, accept: str) -> httpx.Response:
    headers = {"Content-Type": content_type, "Accept": accept}
    return httpx.post(f"{server.url}/v1/rewards", content=body, headers=headers, timeout=60)


@pytest.mark.parametrize("prefix", [False, True])
def test_every_combination_gives_the_json_results(server: LiveServer, prefix: bool) -> None:
    request = _request(1, return_prefix_scores=prefix, beta_c=0.7)
    as_json = request.model_dump_json(exclude_none=True).encode()
    as_binary = binary.encode_request(request)
    reference = RewardResponse.model_validate_json(
        _post(server, as_json, "application/json", "application/json").content
    )
    assert [r.id for r in reference.results] == [f"i{i}" for i in range(12)]
    for body, content_type in ((as_json, "application/json"), (as_binary, BIN)):
        for accept in ("application/json", BIN):
            got = _post(server, body, content_type, accept)
            assert got.status_code == 200, got.text
            assert got.headers["content-type"].startswith(accept)
            if accept == BIN:
                response = binary.decode_response(got.content)
            else:
                response = RewardResponse.model_validate_json(got.content)
            # The same items may batch differently: equal up to float rounding.
            for mine, want in zip(response.results, reference.results, strict=True):
                assert mine.id == want.id
                assert mine.token_rewards == pytest.approx(want.token_rewards, abs=1e-6)
                assert mine.score == pytest.approx(want.score, abs=1e-6)
                assert (mine.prefix_scores is None) == (not prefix)


def test_the_model_lists_the_encodings(server: LiveServer) -> None:
    info = httpx.get(f"{server.url}/v1/model", timeout=10).json()
    assert info["encodings"] == ["application/json", BIN]


def test_errors_keep_the_json_error_shape(server: LiveServer) -> None:
    body = binary.encode_request(_request(2))
    truncated = _post(server, body[:-3], BIN, BIN)
    assert truncated.status_code == 422
    assert truncated.headers["content-type"].startswith("application/json")
    assert "binary body: the body ends inside the token IDs" in truncated.json()["error"]["message"]
    too_many = _post(server, binary.encode_request(_request(3, n=65)), BIN, BIN)
    assert too_many.status_code == 413  # the server's limit is 64 items
    assert too_many.json()["error"]["type"] == "too_large"
    out_of_vocab = _request(4, n=3)
    items = list(out_of_vocab.items)
    items[1] = RewardItem(prompt_ids=[1], response_ids=[99999])
    bad = _post(server, binary.encode_request(RewardRequest(items=items)), BIN, BIN)
    assert bad.status_code == 422
    assert bad.json()["error"]["item"] == 1
    # A JSON body sent as binary is a format error, not a crash.
    assert _post(server, b'{"items": []}', BIN, BIN).status_code == 422
