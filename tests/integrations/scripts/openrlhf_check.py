"""Runs in .venvs/openrlhf: OpenRLHF's own code against a live ``tokenreward serve``.

Usage: openrlhf_check.py URL POLICY_TOKENIZER_DIR POLICY_NAME. Prints one JSON line.

- OpenRLHF's rollout executor (``SingleTurnAgentExecutor.execute``, the code behind
  ``--reward.remote_url``) posts to ``/get_reward``. Generation is the one stand-in: an object
  shaped like vLLM's engine and outputs (vLLM cannot be installed here) returning fixed
  continuations; the decoding, request and reading of the answer are OpenRLHF's.
- OpenRLHF's ``compute_reward`` (``openrlhf/models/utils.py``, loaded from the installed file;
  ``deepspeed``, imported at its top and unused by it, is an empty module here because it
  cannot be installed without CUDA) against our ``dense_compute_reward``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import sys
import types
from pathlib import Path
from typing import Any

import httpx
import openrlhf
import torch
from openrlhf.utils.agent import SingleTurnAgentExecutor
from transformers import AutoTokenizer

from tokenreward import RewardClient
from tokenreward.integrations.openrlhf import dense_compute_reward, token_rewards

URL, TOKENIZER_DIR, POLICY = sys.argv[1:4]
tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
EOT = tokenizer.convert_tokens_to_ids("<|eot_id|>")


def chat(user: str) -> str:
    """A prompt as OpenRLHF's dataset renders it: the policy's (Llama 3) chat template."""
    return (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        f"{user}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


SAMPLES: list[tuple[str, str]] = [
    (chat("Write a tweet about the weather."), "what a lovely sunny morning, so happy"),
    (chat("Review the hotel."), "the room was dirty and the wifi never worked"),
    (chat("How was the film?"), "Great film. I loved every minute!"),
    (chat("hi"), "ok"),
]


class StandInOutput:
    """vLLM's ``CompletionOutput`` fields that OpenRLHF reads."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids
        self.finish_reason = "stop"
        self.logprobs = None


class StandInEngine:
    """vLLM's engine as OpenRLHF calls it: ``await generate(prompt_ids, params, ...)``."""

    def __init__(self, continuation: str) -> None:
        self.ids = [*tokenizer.encode(continuation, add_special_tokens=False), EOT]

    async def generate(self, prompt_ids: list[int], params: Any, multi_modal_data: Any = None):
        return types.SimpleNamespace(outputs=[StandInOutput(list(self.ids))])


def v1_rewards(items: list[dict[str, Any]], **options: Any) -> list[dict[str, Any]]:
    got = httpx.post(f"{URL}/v1/rewards", json={"items": items, **options}, timeout=60)
    got.raise_for_status()
    return got.json()["results"]


async def rollouts(url: str, samples: int = len(SAMPLES)) -> list[dict[str, Any]]:
    executor = SingleTurnAgentExecutor(remote_rm_url=[url])
    params = types.SimpleNamespace(max_tokens=64, logprobs=None)
    return [
        await executor.execute(prompt, "", params, 512, tokenizer, StandInEngine(response))
        for prompt, response in SAMPLES[:samples]
    ]


def close(a: float, b: float) -> bool:
    """Equal but for float noise: a request's batch (its padding) may differ from another's."""
    return abs(a - b) <= 1e-5 * max(1.0, abs(b))


report: dict[str, Any] = {}
# The rollouts, with the server tokenizing each query with the policy's tokenizer: the scores
# equal /v1/rewards' for the policy token IDs that OpenRLHF generated.
POLICY_URL = f"{URL}/get_reward?policy_tokenizer={POLICY}"
outputs = asyncio.run(rollouts(POLICY_URL))
split = [o["action_ranges"][0][0] for o in outputs]
per_policy = v1_rewards(
    [
        {"prompt_ids": o["observation_tokens"][:at], "response_ids": o["observation_tokens"][at:]}
        for o, at in zip(outputs, split, strict=True)
    ],
    policy_tokenizer=POLICY,
)
for output, want in zip(outputs, per_policy, strict=True):
    (reward,) = output["reward"]
    assert close(reward, want["score"]), (reward, want["score"])
    assert output["scores"] == output["reward"]
    assert close(output["extra_logs"]["prompt_score"][0], want["prompt_score"])
    assert output["extra_logs"]["response_tokens"] == [len(want["token_rewards"])]
report["rollout_rewards"] = [o["reward"][0] for o in outputs]
assert len(set(report["rollout_rewards"])) == len(SAMPLES)

# Without the policy tokenizer: text items for the RM's tokenizer (markers read as text).
queries = [tokenizer.decode(o["observation_tokens"], skip_special_tokens=False) for o in outputs]
assert all(q.endswith("<|eot_id|>") for q in queries), queries
plain = asyncio.run(rollouts(f"{URL}/get_reward"))
as_text = v1_rewards(
    [{"prompt": p, "response": q[len(p) :]} for (p, _), q in zip(SAMPLES, queries, strict=True)]
)
for output, want in zip(plain, as_text, strict=True):
    assert close(output["reward"][0], want["score"]), (output["reward"], want["score"])

# Several URLs: OpenRLHF shards a batch across them and concatenates the answers in order.
sharded = SingleTurnAgentExecutor(remote_rm_url=[POLICY_URL, POLICY_URL])
answers = asyncio.run(
    sharded._fetch_rewards_via_http(queries, [p for p, _ in SAMPLES], [""] * len(SAMPLES))
)
assert [len(a["rewards"]) for a in answers] == [2, 2]
together = [r for a in answers for r in a["rewards"]]
assert all(close(a, b) for a, b in zip(together, report["rollout_rewards"], strict=True))

# OpenRLHF's compute_reward, loaded from the installed file.
sys.modules.setdefault("deepspeed", types.ModuleType("deepspeed"))
path = Path(openrlhf.__file__).parent / "models" / "utils.py"
spec = importlib.util.spec_from_file_location("openrlhf_models_utils", path)
assert spec is not None
assert spec.loader is not None
models_utils = importlib.util.module_from_spec(spec)
spec.loader.exec_module(models_utils)
compute_reward = models_utils.compute_reward

# 1. With the scalar on the last action token and zeros elsewhere, the replacement returns
#    exactly what compute_reward returns, on random batches (left and right padding).
generator = torch.Generator().manual_seed(0)
for trial in range(200):
    batch, width = 1 + trial % 5, 2 + trial % 17
    mask = torch.zeros(batch, width, dtype=torch.long)
    one_hot = torch.zeros(batch, width)
    scalar = torch.randn(batch, generator=generator) * 3
    for row in range(batch):
        start = int(torch.randint(0, width, (1,), generator=generator))
        end = int(torch.randint(start + 1, width + 1, (1,), generator=generator))
        mask[row, start:end] = 1
        one_hot[row, end - 1] = scalar[row]
    kl = torch.randn(batch, width, generator=generator) * mask
    coef = [0.0, 0.01, 0.2, -1.0][trial % 4]
    clip = (-2.0, 2.0) if trial % 3 == 0 else None
    want_tensor = compute_reward(scalar, coef, kl, action_mask=mask, reward_clip_range=clip)
    got_tensor = dense_compute_reward(one_hot, coef, kl, action_mask=mask, reward_clip_range=clip)
    assert torch.equal(want_tensor, got_tensor), (trial, want_tensor, got_tensor)
report["equal_to_compute_reward_on_random_batches"] = 200

# 2. The service's per-token rewards, on experiences laid out as OpenRLHF lays them out
#    (samples_generator._process_response_into_experience: sequences = observation tokens,
#    action_mask = the action range shifted by one), batched with left padding.
longest = max(len(o["observation_tokens"]) for o in outputs)
sequences = torch.zeros(len(outputs), longest, dtype=torch.long)
attention = torch.zeros(len(outputs), longest, dtype=torch.long)
actions = torch.zeros(len(outputs), longest, dtype=torch.long)
for row, output in enumerate(outputs):
    ids = output["observation_tokens"]
    pad = longest - len(ids)
    sequences[row, pad:] = torch.tensor(ids)
    attention[row, pad:] = 1
    ((start, end),) = output["action_ranges"]
    actions[row, pad + start : pad + end] = 1
action_mask = actions[:, 1:]
with RewardClient(URL) as client:
    dense = token_rewards(client, sequences, attention, action_mask, policy_tokenizer=POLICY)
assert dense.shape == action_mask.shape
assert torch.all(dense[action_mask == 0] == 0)
for row, want in enumerate(per_policy):
    got_row = dense[row][action_mask[row].bool()].tolist()
    assert got_row == torch.tensor(want["token_rewards"], dtype=torch.float32).tolist(), row
    telescoped = want["score"] - want["prompt_score"]
    assert abs(sum(got_row) - telescoped) < 1e-4, (row, sum(got_row), telescoped)
kl = torch.rand(action_mask.shape, generator=generator) * action_mask
shaped = dense_compute_reward(dense, 0.05, kl, action_mask=action_mask)
assert torch.allclose(shaped + 0.05 * kl, dense, atol=1e-7)
report["policy_tokens_rewarded"] = int(action_mask.sum())

# The README's patch, run as written where OpenRLHF runs it (names as in experience_maker.py).
readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
match = re.search(r"<!-- example: openrlhf-patch -->\n```python\n(.*?)```", readme, flags=re.S)
assert match, "README has no openrlhf-patch example"
with RewardClient(URL) as client:
    namespace: dict[str, Any] = {
        "client": client,
        "experience": types.SimpleNamespace(
            sequences=sequences, attention_mask=attention, action_mask=action_mask, kl=kl
        ),
        "self": types.SimpleNamespace(kl_ctl=types.SimpleNamespace(value=0.05)),
        "args": types.SimpleNamespace(reward=types.SimpleNamespace(clip_range=None)),
    }
    exec(match.group(1).replace('"policy"', repr(POLICY)), namespace)
assert torch.allclose(namespace["reward"], shaped, atol=1e-6)

# A refused request: OpenRLHF retries it 5 times, logs the failure and leaves the sample
# without a reward (None), as the README says.
(refused,) = asyncio.run(rollouts(f"{URL}/get_reward?policy_tokenizer=not-loaded", 1))
assert refused["reward"] is None, refused
assert refused["scores"] is None
report["refused_reward"] = refused["reward"]
# The README's flag is the one OpenRLHF's PPO entry point defines.
flag = re.search(r"# OpenRLHF: (--[\w.]+) 'http://rm:8000/get_reward", readme)
assert flag, "README names no --reward.remote_url"
cli = (Path(openrlhf.__file__).parent / "cli" / "train_ppo_ray.py").read_text()
assert f'parser.add_argument("{flag.group(1)}"' in cli
report["openrlhf"] = openrlhf.__file__
print(json.dumps(report))
