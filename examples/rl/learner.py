"""The learner: PPO with a critic, GAE and the per-token KL penalty of Eq. 8, trained on the
per-token rewards the rollout worker brings back from the service.

    python examples/rl/learner.py --policy DIR --config JSON --curves OUT.json

It listens on 127.0.0.1 (a free port, printed as ``LISTENING <port>``), waits for one rollout
worker, then for each update: sends the policy's weights and prompts, receives the
trajectories, checks that each response has exactly one reward per token, and runs the PPO
epochs. Every update's figures go to the curves file, with sample texts at the start and end.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Any

import torch
from common import (
    RunConfig,
    gather_responses,
    load_policy,
    load_policy_tokenizer,
    prompts_for,
    quiet_transformers,
    response_logprobs,
)

from tokenreward.integrations.learner import ppo_token_rewards
from tokenreward_service.demo.data import load_corpus, split_by_text
from tokenreward_service.model import right_pad


class Critic(torch.nn.Module):
    """The policy's trunk (a copy, trained on its own) with a scalar value head."""

    def __init__(self, policy_dir: Path) -> None:
        from transformers import AutoModel

        quiet_transformers()
        super().__init__()
        self.trunk = AutoModel.from_pretrained(policy_dir, dtype=torch.float32)
        self.head = torch.nn.Linear(self.trunk.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.trunk(input_ids=ids, attention_mask=mask).last_hidden_state
        values: torch.Tensor = self.head(hidden).squeeze(-1)
        return values


def response_values(
    critic: Critic, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]
) -> torch.Tensor:
    """``[B, T]``: V of the state each response token is chosen in (everything before it)."""
    ids, mask = right_pad([list(p) + list(r) for p, r in zip(prompts, responses, strict=True)])
    return gather_responses(critic(ids, mask)[:, :-1], prompts, responses)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded ``[B, T]`` rows: the value after a
    response's last token is 0 (the episode ends there). Returns (advantages, returns)."""
    mask = mask.to(rewards.dtype)
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        following = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * following - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


class PPO:
    def __init__(self, policy_dir: Path, config: RunConfig) -> None:
        self.config = config
        torch.manual_seed(config.seed)
        self.tokenizer = load_policy_tokenizer(policy_dir)
        self.policy = load_policy(policy_dir).train()
        self.reference = load_policy(policy_dir).eval().requires_grad_(False)
        self.critic = Critic(policy_dir).train()
        self.policy_opt = torch.optim.Adam(self.policy.parameters(), lr=config.policy_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr)
        self.rng = random.Random(config.seed)

    def state_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(self.policy.state_dict(), buffer)
        return buffer.getvalue()

    def update(
        self, prompts: list[list[int]], batch: dict[str, Any], train_policy: bool
    ) -> dict[str, float]:
        c = self.config
        responses: list[list[int]] = batch["responses"]
        width = max(len(r) for r in responses)
        old_logp = torch.zeros((len(responses), width))
        token_rewards = torch.zeros((len(responses), width))
        mask = torch.zeros((len(responses), width))
        for i, (r, lp, tr) in enumerate(
            zip(responses, batch["logprobs"], batch["token_rewards"], strict=True)
        ):
            old_logp[i, : len(r)] = torch.tensor(lp)
            token_rewards[i, : len(r)] = torch.tensor(tr)
            mask[i, : len(r)] = 1
        with torch.no_grad():
            ref_logp = response_logprobs(self.reference, prompts, responses)
            old_values = response_values(self.critic, prompts, responses)
        rewards = ppo_token_rewards(token_rewards, old_logp, ref_logp, mask, beta=c.kl_beta)
        advantages, returns = gae(rewards, old_values, mask, gamma=c.gamma, lam=c.lam)
        advantages = whiten(advantages, mask)
        order = list(range(len(responses)))
        stats: dict[str, list[float]] = {"value_loss": [], "policy_loss": [], "clip_fraction": []}
        for _ in range(c.ppo_epochs):
            self.rng.shuffle(order)
            size = -(-len(order) // c.minibatches)
            for start in range(0, len(order), size):
                rows = order[start : start + size]
                m = mask[rows]
                some_prompts = [prompts[i] for i in rows]
                some_responses = [responses[i] for i in rows]
                cols = slice(0, max(len(x) for x in some_responses))
                m = m[:, cols]
                values = response_values(self.critic, some_prompts, some_responses)
                clipped = old_values[rows][:, cols] + (values - old_values[rows][:, cols]).clamp(
                    -c.value_clip, c.value_clip
                )
                target = returns[rows][:, cols]
                value_loss = 0.5 * masked_mean(
                    torch.maximum((values - target) ** 2, (clipped - target) ** 2), m
                )
                self.critic_opt.zero_grad()
                value_loss.backward()  # type: ignore[no-untyped-call]
                torch.nn.utils.clip_grad_norm_(self.critic.parameters(), c.max_grad_norm)
                self.critic_opt.step()
                stats["value_loss"].append(value_loss.item())
                if not train_policy:
                    continue
                logp = response_logprobs(self.policy, some_prompts, some_responses)
                ratio = torch.exp(logp - old_logp[rows][:, cols])
                adv = advantages[rows][:, cols]
                loss = masked_mean(
                    -torch.minimum(ratio * adv, ratio.clamp(1 - c.clip, 1 + c.clip) * adv), m
                )
                self.policy_opt.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), c.max_grad_norm)
                self.policy_opt.step()
                stats["policy_loss"].append(loss.item())
                stats["clip_fraction"].append(
                    masked_mean(((ratio - 1).abs() > c.clip).float(), m).item()
                )
        kl = ((old_logp - ref_logp) * mask).sum(1)
        return {
            "score": sum(batch["scores"]) / len(batch["scores"]),
            "kl": kl.mean().item(),
            "length": mask.sum(1).mean().item(),
            "value_loss": sum(stats["value_loss"]) / len(stats["value_loss"]),
            "policy_loss": _mean(stats["policy_loss"]),
            "clip_fraction": _mean(stats["clip_fraction"]),
            "token_reward_sum": (token_rewards * mask).sum(1).mean().item(),
        }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def check_counts(batch: dict[str, Any]) -> int:
    """The number of reward-carrying tokens, after checking that each response has exactly one
    reward per policy token (a learner must never train on shifted credit)."""
    if len(batch["token_rewards"]) != len(batch["responses"]):
        raise RuntimeError(
            f"{len(batch['responses'])} responses but {len(batch['token_rewards'])} reward lists"
        )
    for i, (response, rewards) in enumerate(
        zip(batch["responses"], batch["token_rewards"], strict=True)
    ):
        if len(rewards) != len(response):
            raise RuntimeError(f"response {i}: {len(response)} tokens but {len(rewards)} rewards")
    return sum(len(r) for r in batch["responses"])


def run(
    conn: Any, policy_dir: Path, config: RunConfig, curves_path: Path, log: Any
) -> dict[str, Any]:
    ppo = PPO(policy_dir, config)
    train, _ = split_by_text(load_corpus(), seed=0, heldout_fraction=0.1)
    pool = prompts_for([e.text for e in train], ppo.tokenizer, count=4000, seed=1000 + config.seed)
    rng = random.Random(config.seed)
    curves: list[dict[str, Any]] = []
    samples: dict[str, list[dict[str, Any]]] = {}
    started = time.perf_counter()
    for update in range(config.updates):
        chosen = rng.sample(pool, config.prompts_per_update)
        prompts = [p for p in chosen for _ in range(config.samples_per_prompt)]
        conn.send(
            {
                "cmd": "rollout",
                "state": ppo.state_bytes(),
                "prompts": prompts,
                "seed": config.seed * 100_003 + update,
                "max_new_tokens": config.max_new_tokens,
                "temperature": config.temperature,
            }
        )
        batch = conn.recv()
        tokens = check_counts(batch)
        if update in (0, config.updates - 1):
            samples["start" if update == 0 else "end"] = [
                {
                    "prompt": ppo.tokenizer.decode(prompts[i], skip_special_tokens=True),
                    "response": batch["texts"][i],
                    "score": batch["scores"][i],
                }
                for i in range(0, len(prompts), config.samples_per_prompt)[: config.sample_count]
            ]
        learn_started = time.perf_counter()
        figures: dict[str, Any] = dict(
            ppo.update(prompts, batch, train_policy=update >= config.critic_warmup)
        )
        figures.update(
            update=update,
            responses=len(batch["responses"]),
            reward_tokens=sum(len(r) for r in batch["token_rewards"]),
            response_tokens=tokens,
            seconds={**batch["seconds"], "learn": time.perf_counter() - learn_started},
        )
        curves.append(figures)
        elapsed = time.perf_counter() - started
        if (update + 1) % 10 == 0 or update + 1 == config.updates:
            eta = elapsed / (update + 1) * (config.updates - update - 1)
            log(
                f"beta_c={config.beta_c} seed={config.seed} update {update + 1}/{config.updates}: "
                f"score {figures['score']:+.3f} kl {figures['kl']:.3f} "
                f"length {figures['length']:.1f}, ETA {eta:.0f} s"
            )
    conn.send({"cmd": "stop"})
    result = {
        "config": json.loads(config.to_json()),
        "curves": curves,
        "samples": samples,
        "seconds": time.perf_counter() - started,
    }
    curves_path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--policy", type=Path, required=True)
    parser.add_argument("--config", required=True, help="RunConfig as JSON")
    parser.add_argument("--curves", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = RunConfig.from_json(args.config)
    authkey = os.environ["TOKENREWARD_RL_AUTHKEY"].encode()
    with Listener(("127.0.0.1", 0), authkey=authkey) as listener:
        print(f"LISTENING {listener.address[1]}", flush=True)
        with listener.accept() as conn:
            run(
                conn,
                args.policy,
                config,
                args.curves,
                lambda m: print(m, file=sys.stderr, flush=True),
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
