"""The wire encodings of ``POST /v1/rewards`` compared, per 1,000 items, no network.

    .venv/bin/python benchmarks/wire_encoding.py [--items 1000] [--prompt 256] [--response 256]

For JSON and for the binary encoding (tokenreward.binary), each of the four steps a request
takes on the host, with the code that takes it: the request written (from a RewardRequest),
the request read by the server (its own parse function: decode and validate), the response
written by the server (from the RewardResponse its service builds), and the response read
back into RewardResponse. Token IDs are drawn from a 128k vocabulary; rewards are random
float64. Prints milliseconds (median of --repeats) and body sizes.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import orjson

from tokenreward import binary
from tokenreward.protocol import ModelRef, RewardItem, RewardRequest, RewardResponse, RewardResult
from tokenreward_service.routes import parse_binary_request, parse_reward_request


def _median_ms(step: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(0)
    request = RewardRequest(
        items=[
            RewardItem(
                id=str(i),
                prompt_ids=[rng.randrange(128_000) for _ in range(args.prompt)],
                response_ids=[rng.randrange(128_000) for _ in range(args.response)],
            )
            for i in range(args.items)
        ]
    )
    response = RewardResponse(
        model=ModelRef(id="m", revision="sha256:" + "0" * 64),
        results=[
            RewardResult(
                id=str(i),
                token_rewards=[rng.gauss(0, 1) for _ in range(args.response)],
                score=rng.gauss(0, 1),
                prompt_score=rng.gauss(0, 1),
            )
            for i in range(args.items)
        ],
    )
    limit = args.items
    steps: dict[str, dict[str, Callable[[Any], Any]]] = {
        "json": {
            "write request": lambda _: orjson.dumps(request.model_dump(exclude_none=True)),
            "read request": lambda body: parse_reward_request(body, limit),
            "write response": lambda _: orjson.dumps(response.model_dump(mode="json")),
            "read response": lambda body: RewardResponse.model_validate(orjson.loads(body)),
        },
        "binary": {
            "write request": lambda _: binary.encode_request(request),
            "read request": lambda body: parse_binary_request(body, limit),
            "write response": lambda _: binary.encode_response(response),
            "read response": binary.decode_response,
        },
    }
    per = 1000 / args.items
    print(f"{args.items} items of {args.prompt} prompt + {args.response} response tokens")
    print(
        f"{'':8} {'write req':>10} {'read req':>10} {'write resp':>11} {'read resp':>10}"
        f" {'total ms':>9} {'request':>9} {'response':>9}   (ms per 1,000 items)"
    )
    for name, four in steps.items():
        scaled = [ms * per for ms in _four_steps(four, request, response, args.repeats)[0]]
        sizes = _four_steps(four, request, response, 1)[1]
        print(
            f"{name:8} {scaled[0]:10.1f} {scaled[1]:10.1f} {scaled[2]:11.1f} {scaled[3]:10.1f}"
            f" {sum(scaled):9.1f} {sizes[0] / 1e6:8.2f}M {sizes[1] / 1e6:8.2f}M"
        )


def _four_steps(
    four: dict[str, Callable[[Any], Any]],
    request: RewardRequest,
    response: RewardResponse,
    repeats: int,
) -> tuple[list[float], tuple[int, int]]:
    """Milliseconds of each step, checking that what is read back is what was written; and
    the two body sizes."""
    figures = []
    ms, request_body = _median_ms(lambda: four["write request"](None), repeats)
    figures.append(ms)
    ms, parsed = _median_ms(lambda: four["read request"](request_body), repeats)
    assert parsed == request
    figures.append(ms)
    ms, response_body = _median_ms(lambda: four["write response"](None), repeats)
    figures.append(ms)
    ms, read = _median_ms(lambda: four["read response"](response_body), repeats)
    assert read == response
    figures.append(ms)
    return figures, (len(request_body), len(response_body))


if __name__ == "__main__":
    main()
