"""Runs in .venvs/skyrl: our SkyRL generator wrapper, and SkyRL 0.3.0's own batch layout of its
rewards (``convert_prompts_responses_to_batch_tensors``), against a live ``tokenreward serve``.

Usage: skyrl_check.py URL POLICY_TOKENIZER_DIR POLICY_NAME. Prints one JSON line.
The inner generator is a stand-in returning fixed responses in SkyRL's ``GeneratorOutput``
shape (its real generators need an inference engine, vLLM or SGLang, which cannot run here).
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import torch
from skyrl.train.dataset.preprocess import convert_prompts_responses_to_batch_tensors
from transformers import AutoTokenizer

from tokenreward import AsyncRewardClient
from tokenreward.integrations.skyrl import TokenRewardGenerator, token_rewards

URL, TOKENIZER_DIR, POLICY = sys.argv[1:4]


def generator_output_fields() -> set[str]:
    """The keys of SkyRL's ``GeneratorOutput``, read from its source: on Python 3.11 the module
    does not import in skyrl 0.3.0 (pydantic refuses a typing.TypedDict elsewhere in the
    package it imports)."""
    spec = importlib.util.find_spec("skyrl")
    assert spec is not None
    assert spec.origin is not None
    base = Path(spec.origin).parent / "train" / "generators" / "base.py"
    for node in ast.parse(base.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == "GeneratorOutput":
            return {f.target.id for f in node.body if isinstance(f, ast.AnnAssign)}
    raise AssertionError("GeneratorOutput not found")


tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
tokenizer.pad_token_id = tokenizer.pad_token_id or 0
EOT = tokenizer.convert_tokens_to_ids("<|eot_id|>")
TEXTS = [
    ("Write a tweet about the weather.", "what a lovely sunny morning, so happy"),
    ("Review the hotel.", "the room was dirty and the wifi never worked"),
    ("hi", "ok"),
]


class StandInGenerator:
    """A SkyRL generator's output for fixed responses (env reward: 1.0 for the first sample)."""

    async def generate(self, input_batch: dict[str, Any]) -> dict[str, Any]:
        prompts = [tokenizer.encode(p) for p, _ in TEXTS]
        responses = [[*tokenizer.encode(r, add_special_tokens=False), EOT] for _, r in TEXTS]
        return {
            "prompt_token_ids": prompts,
            "response_ids": responses,
            "rewards": [1.0, 0.0, 0.0],
            "loss_masks": [[1] * len(r) for r in responses],
            "stop_reasons": ["stop"] * len(TEXTS),
            "rollout_metrics": None,
            "rollout_logprobs": None,
        }


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 * max(1.0, abs(b))


async def main() -> dict[str, Any]:
    report: dict[str, Any] = {}
    async with AsyncRewardClient(URL) as client:
        generator = TokenRewardGenerator(StandInGenerator(), client, policy_tokenizer=POLICY)
        output = await generator.generate({"prompts": []})
        keeping = TokenRewardGenerator(
            StandInGenerator(), client, policy_tokenizer=POLICY, keep_env_rewards=True
        )
        kept = await keeping.generate({"prompts": []})
        multi = StandInGenerator()
        multi_output = await multi.generate({})
        multi_output["loss_masks"][1][2] = 0  # an observation inside the response
        try:
            await token_rewards(
                client,
                multi_output["prompt_token_ids"],
                multi_output["response_ids"],
                policy_tokenizer=POLICY,
                loss_masks=multi_output["loss_masks"],
            )
            raise AssertionError("a multi-turn loss mask was accepted")
        except ValueError as exc:
            report["multi_turn_refused"] = str(exc)
    items = [
        {"prompt_ids": p, "response_ids": r}
        for p, r in zip(output["prompt_token_ids"], output["response_ids"], strict=True)
    ]
    body = {"items": items, "policy_tokenizer": POLICY}
    async with httpx.AsyncClient(timeout=60) as http:
        want = (await http.post(f"{URL}/v1/rewards", json=body)).json()["results"]
    fields = generator_output_fields()
    assert {"prompt_token_ids", "response_ids", "rewards", "loss_masks"} <= fields
    assert set(output) <= fields, set(output) - fields
    for row, result in enumerate(want):
        got = output["rewards"][row]
        assert isinstance(got, list)
        assert len(got) == len(output["response_ids"][row])
        assert all(close(a, b) for a, b in zip(got, result["token_rewards"], strict=True)), row
        telescoped = result["score"] - result["prompt_score"]
        assert abs(sum(got) - telescoped) < 1e-4
        extra = [k - g for k, g in zip(kept["rewards"][row], got, strict=True)]
        assert all(abs(e) < 1e-6 for e in extra[:-1])
        assert abs(extra[-1] - [1.0, 0.0, 0.0][row]) < 1e-6
    # SkyRL's own layout: right-aligned rewards under the action mask, zeros elsewhere.
    _, _, action_mask, rewards, _, _, _ = convert_prompts_responses_to_batch_tensors(
        tokenizer,
        output["prompt_token_ids"],
        output["response_ids"],
        output["rewards"],
        output["loss_masks"],
    )
    assert rewards.shape == action_mask.shape
    assert torch.all(rewards[action_mask == 0] == 0)
    for row, got in enumerate(output["rewards"]):
        laid_out = rewards[row][action_mask[row].bool()]
        assert torch.equal(laid_out, torch.tensor(got, dtype=torch.float)), row
    report["token_rewards"] = int(action_mask.sum())
    report["scores"] = [r["score"] for r in want]
    return report


print(json.dumps(asyncio.run(main())))
