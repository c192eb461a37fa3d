"""The rollout worker: samples responses from the current policy with Hugging Face ``generate``
(where a deployment runs vLLM), scores them through the reward service, and hands the
trajectories to the learner.

    python examples/rl/rollout.py --learner 127.0.0.1:PORT --service URL --policy DIR --beta-c 1

It connects to the learner (``multiprocessing.connection``), then answers each ``rollout``
message (the policy's weights, the prompts, a seed) with the sampled token IDs, their
log-probabilities under the sampling policy, the service's per-token rewards and scores.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from multiprocessing.connection import Client
from pathlib import Path
from typing import Any

import torch
from common import EOS, POLICY_NAME, load_policy, load_policy_tokenizer, response_logprobs

from tokenreward import RewardClient


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def sample(
    policy: Any,
    prompts: list[list[int]],
    *,
    eos: int,
    pad: int,
    max_new_tokens: int,
    temperature: float,
) -> list[list[int]]:
    """One response per prompt, each up to and including its EOS (or ``max_new_tokens`` long)."""
    ids, mask = left_pad(prompts, pad)
    out = policy.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    responses = []
    for row in out[:, ids.shape[1] :].tolist():
        cut = row.index(eos) + 1 if eos in row else len(row)
        responses.append(row[:cut])
    return responses


def serve_rollouts(conn: Any, service: str, policy_dir: Path, beta_c: float) -> int:
    tokenizer = load_policy_tokenizer(policy_dir)
    policy = load_policy(policy_dir).eval()
    eos, pad = tokenizer.convert_tokens_to_ids(EOS), tokenizer.pad_token_id
    rollouts = 0
    with RewardClient(service, timeout=120.0) as client:
        while True:
            message = conn.recv()
            if message["cmd"] == "stop":
                return rollouts
            started = time.perf_counter()
            policy.load_state_dict(torch.load(io.BytesIO(message["state"]), weights_only=True))
            torch.manual_seed(message["seed"])
            prompts: list[list[int]] = message["prompts"]
            with torch.no_grad():
                responses = sample(
                    policy,
                    prompts,
                    eos=eos,
                    pad=pad,
                    max_new_tokens=message["max_new_tokens"],
                    temperature=message["temperature"],
                )
                logprobs = response_logprobs(policy, prompts, responses)
            generated = time.perf_counter()
            items = [
                {"prompt_ids": p, "response_ids": r}
                for p, r in zip(prompts, responses, strict=True)
            ]
            results = client.rewards(items, beta_c=beta_c, policy_tokenizer=POLICY_NAME)
            rewarded = time.perf_counter()
            conn.send(
                {
                    "responses": responses,
                    "logprobs": [
                        row[: len(r)].tolist() for row, r in zip(logprobs, responses, strict=True)
                    ],
                    "token_rewards": [list(r.token_rewards) for r in results],
                    "scores": [r.score for r in results],
                    "texts": tokenizer.batch_decode(responses, skip_special_tokens=True),
                    "seconds": {"generate": generated - started, "reward": rewarded - generated},
                }
            )
            rollouts += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--learner", required=True, help="host:port the learner listens on")
    parser.add_argument("--service", required=True, help="the reward service's URL")
    parser.add_argument("--policy", type=Path, required=True)
    parser.add_argument("--beta-c", type=float, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    host, port = args.learner.rsplit(":", 1)
    authkey = os.environ["TOKENREWARD_RL_AUTHKEY"].encode()
    with Client((host, int(port)), authkey=authkey) as conn:
        serve_rollouts(conn, args.service, args.policy, args.beta_c)
    return 0


if __name__ == "__main__":
    sys.exit(main())
