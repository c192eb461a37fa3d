"""Client overhead per 1,000 items: encoding requests and decoding responses, no network.

    .venv/bin/python benchmarks/client_overhead.py [--items 1000] [--prompt 256] [--response 256]

Encoding is what ``rewards()`` does before sending (normalise items, validate, split into
chunks, serialise JSON); decoding is what it does with each answer (parse and validate the
JSON, check counts and ids). The response body is built in the server's own format with the
server's own serialiser, so its size and float formatting are the real ones.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import orjson

from tokenreward._base import BaseRewardClient


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(0)
    items = [
        (
            [rng.randrange(128_000) for _ in range(args.prompt)],
            [rng.randrange(128_000) for _ in range(args.response)],
        )
        for _ in range(args.items)
    ]
    base = BaseRewardClient("http://127.0.0.1:1", max_items_per_request=args.items)
    encode, decode = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        (chunk,) = base.plan(items, beta_c=1.0, baseline="prompt", return_prefix_scores=False)
        encode.append(time.perf_counter() - started)
        body = orjson.dumps(
            {
                "model": {"id": "m", "revision": "sha256:" + "0" * 64},
                "results": [
                    {
                        "id": chunk.ids[i],  # the server echoes the ids the client sent
                        "token_rewards": [rng.gauss(0, 1) for _ in range(args.response)],
                        "score": rng.gauss(0, 1),
                        "prompt_score": rng.gauss(0, 1),
                        "prefix_scores": None,
                    }
                    for i in range(args.items)
                ],
            }
        )
        started = time.perf_counter()
        outcome = base.outcome("POST", 200, body, {}, chunk, "http://127.0.0.1:1")
        decode.append(time.perf_counter() - started)
        assert outcome.results is not None
        assert len(outcome.results) == args.items
    per_1000 = 1000 / args.items
    report = {
        "items": args.items,
        "prompt_tokens": args.prompt,
        "response_tokens": args.response,
        "request_bytes": len(chunk.body),
        "response_bytes": len(body),
        "encode_ms_per_1000_items": round(statistics.median(encode) * 1000 * per_1000, 2),
        "decode_ms_per_1000_items": round(statistics.median(decode) * 1000 * per_1000, 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
