"""verl 0.9.1's own code drives tokenreward's verl integration (runs in ``.venvs/verl``).

``verl_check.py URL TOKENIZER_DIR POLICY_TOKENIZER_NAME``, the service's API key in
``TOKENREWARD_API_KEY`` (verl's config reads it with ``${oc.env:...}``). Builds rollout batches
with verl's padding code, loads the reward manager the way verl's config does, scores the
batches through verl's callers (the batch form, and the reward loop's
``RewardLoopManager.compute_rm_score`` on a local Ray), and runs the rewards through verl's KL
penalty and GAE; also verl's scalar path (``custom_reward_function`` through its ``naive``
manager). Prints what verl computed as one JSON line; ``tests/integrations/test_verl.py`` checks
it against the service called directly.
"""

from __future__ import annotations

import json
import os
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import verl
from hydra import compose, initialize_config_module
from verl import DataProto
from verl.experimental.agent_loop.agent_loop import (
    AgentLoopMetrics,
    AgentLoopOutput,
    AgentLoopWorker,
)
from verl.experimental.reward_loop import RewardLoopManager
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.ray_trainer import (
    apply_kl_penalty,
    compute_advantage,
    compute_response_mask,
)
from verl.trainer.ppo.reward import (
    extract_reward,
    get_custom_reward_fn,
    load_reward_manager,
)
from verl.utils import hf_tokenizer
from verl.utils.model import compute_position_id_with_mask

from tokenreward.integrations.verl import TokenRewardManager

# (prompt, response, whether the policy ended it with EOS): lengths differ, one is cut off by
# the length limit (no EOS), the last is empty (a row with nothing to reward).
SAMPLES = [
    ("Write one line about the film.", " The movie was very good, I loved every minute.", True),
    ("How was your day?", " Bad.", True),
    ("Review:", " What a great day! Thanks for everything, truly wonderful and kind", False),
    ("Say something.", "", False),
]
PROMPT_LENGTH = 16  # verl's rollout.prompt_length / response_length: the padded widths
RESPONSE_LENGTH = 24
KL_COEF = 0.05


def readme_overrides() -> tuple[list[str], list[str]]:
    """The README's verl block: the per-token overrides, and the scalar form's (commented)."""
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    block = readme.split("#### verl\n", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    dense, scalar = [], []
    for line in block.splitlines():
        text = line.strip().rstrip("\\").strip().strip("'")
        if text.startswith(("reward.", "+reward.")):
            dense.append(text)
        elif text.startswith(("# reward.", "#   reward.", "# +reward.")) or (
            text.startswith("#") and "custom_reward_function" in text
        ):
            scalar.append(text.lstrip("# ").strip())
    assert dense, "README's verl block has no overrides"
    assert scalar, "README's verl block has no scalar form"
    return dense, scalar


def _live(options: list[str], url: str, policy: str) -> list[str]:
    return [o.replace("http://rm:8000", url).replace("=policy", f"={policy}") for o in options]


def overrides(url: str, policy: str, tokenizer_dir: str) -> list[str]:
    """The command-line overrides the README gives verl's trainer (with the live server's URL),
    plus what the test sets beside them: the policy model path from which verl's reward workers
    load the tokenizer, one reward worker, and two settings the README names in prose."""
    dense, _ = readme_overrides()
    assert any("api_key=${oc.env:TOKENREWARD_API_KEY}" in o for o in dense)
    return [
        *_live(dense, url, policy),
        "+reward.reward_kwargs.timeout=60",
        "+reward.reward_kwargs.beta_c=1.0",
        f"actor_rollout_ref.model.path={tokenizer_dir}",
        "reward.num_workers=1",
    ]


def scalar_overrides(url: str, tokenizer_dir: str) -> list[str]:
    _, scalar = readme_overrides()
    return [
        *_live(scalar, url, "policy"),
        "+reward.custom_reward_function.reward_kwargs.api_key=${oc.env:TOKENREWARD_API_KEY}",
        f"actor_rollout_ref.model.path={tokenizer_dir}",
    ]


def config(extra: list[str]) -> Any:
    """verl's trainer config, composed by Hydra exactly as ``python -m verl.trainer.main_ppo``."""
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer", overrides=extra)


def agent_loop_batch(tokenizer: Any, rows: list[tuple[list[int], list[int]]]) -> DataProto:
    """One padded batch as verl's agent loop builds it (``_agent_loop_postprocess``, then
    ``_postprocess``): its own ``_pad_token_ids`` left-pads prompts and right-pads responses."""
    worker = types.SimpleNamespace(tokenizer=tokenizer)
    pieces: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("prompts", "responses", "response_mask", "input_ids", "attention_mask")
    }
    pieces["position_ids"] = []
    for prompt_ids, response_ids in rows:
        prompt = AgentLoopWorker._pad_token_ids(
            worker,
            prompt_ids,
            max_length=PROMPT_LENGTH,
            padding_side="left",
            return_attention_mask=True,
        )
        response = AgentLoopWorker._pad_token_ids(
            worker,
            response_ids,
            max_length=RESPONSE_LENGTH,
            padding_side="right",
            return_attention_mask=True,
        )
        attention = torch.cat([prompt["attention_mask"], response["attention_mask"]], dim=1)
        pieces["prompts"].append(prompt["input_ids"])
        pieces["responses"].append(response["input_ids"])
        pieces["response_mask"].append(response["attention_mask"])
        pieces["input_ids"].append(torch.cat([prompt["input_ids"], response["input_ids"]], dim=1))
        pieces["attention_mask"].append(attention)
        pieces["position_ids"].append(compute_position_id_with_mask(attention))
    return DataProto.from_dict({k: torch.cat(v, dim=0) for k, v in pieces.items()})


def colocated_batch(tokenizer: Any, rows: list[tuple[list[int], list[int]]]) -> DataProto:
    """The batch verl 0.9.1's trainer hands ``RewardLoopManager.compute_rm_score``
    (``_compute_reward_colocate``): prompts and responses both right-padded, the mask rebuilt
    from the lengths."""
    pad = tokenizer.pad_token_id

    def right(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        return ids, mask

    prompts, prompt_mask = right([p for p, _ in rows])
    responses, response_mask = right([r for _, r in rows])
    raw = np.empty(len(rows), dtype=object)
    raw[:] = [[{"role": "user", "content": "unused"}] for _ in rows]
    return DataProto.from_dict(
        {
            "prompts": prompts,
            "responses": responses,
            "attention_mask": torch.cat([prompt_mask, response_mask], dim=1),
        },
        non_tensors={"raw_prompt": raw},
    )


def gae(batch: DataProto, cfg: Any) -> dict[str, Any]:
    """token_level_scores -> verl's KL penalty -> token_level_rewards -> verl's GAE."""
    torch.manual_seed(0)
    shape = batch.batch["responses"].shape
    batch.batch["response_mask"] = compute_response_mask(batch)
    mask = batch.batch["response_mask"]
    batch.batch["old_log_probs"] = -torch.rand(shape)
    batch.batch["ref_log_prob"] = -torch.rand(shape)
    batch.batch["values"] = torch.randn(shape) * mask
    batch, _ = apply_kl_penalty(batch, kl_ctrl=core_algos.FixedKLController(KL_COEF))
    kld = core_algos.kl_penalty(batch.batch["old_log_probs"], batch.batch["ref_log_prob"], "kl")
    gae_estimator = core_algos.AdvantageEstimator.GAE
    batch = compute_advantage(
        batch, adv_estimator=gae_estimator, gamma=0.99, lam=0.95, config=cfg.algorithm
    )
    # gamma = lam = 1 and zero values: the return at the first response token is the sum of
    # every reward GAE took in.
    _, plain_returns = core_algos.compute_gae_advantage_return(
        token_level_rewards=batch.batch["token_level_scores"],
        values=torch.zeros(shape),
        response_mask=mask,
        gamma=1.0,
        lam=1.0,
    )
    return {
        "response_mask": mask.tolist(),
        "token_level_scores": batch.batch["token_level_scores"].tolist(),
        "token_level_rewards": batch.batch["token_level_rewards"].tolist(),
        "kl_term": (KL_COEF * kld * mask).tolist(),
        "advantages": batch.batch["advantages"].tolist(),
        "returns": batch.batch["returns"].tolist(),
        "undiscounted_returns": plain_returns.tolist(),
    }


def main() -> None:
    url, tokenizer_dir, policy = sys.argv[1:4]
    seconds: dict[str, float] = {}
    begun = time.monotonic()
    tokenizer = hf_tokenizer(tokenizer_dir)  # verl's own loader: it fixes up the pad token
    rows = []
    for prompt, response, eos in SAMPLES:
        response_ids = tokenizer(response, add_special_tokens=False).input_ids if response else []
        rows.append(
            (tokenizer(prompt).input_ids, response_ids + ([tokenizer.eos_token_id] if eos else []))
        )
    cfg = config(overrides(url, policy, tokenizer_dir))
    out: dict[str, Any] = {
        "verl": verl.__version__,
        "rows": [{"prompt_ids": p, "response_ids": r} for p, r in rows],
    }

    # 1. The batch form, the manager loaded by verl's loader from the config.
    started = time.monotonic()
    manager = load_reward_manager(cfg, tokenizer)
    batch = agent_loop_batch(tokenizer, rows)
    answer = manager(batch, return_dict=True)
    batch.batch["token_level_scores"] = answer["reward_tensor"]
    out["manager"] = f"{type(manager).__module__}.{type(manager).__qualname__}"
    out["batch_form"] = {
        "prompt_width": batch.batch["prompts"].shape[1],
        "prompt_attention": batch.batch["attention_mask"][:, :PROMPT_LENGTH].tolist(),
        "reward_tensor": answer["reward_tensor"].tolist(),
        "dtype": str(answer["reward_tensor"].dtype),
        "reward_extra_info": answer["reward_extra_info"],
        **gae(batch, cfg),
    }
    # A multi-turn row (tool output inside the response, response_mask 0 there) is refused.
    multi_turn = agent_loop_batch(tokenizer, rows)
    multi_turn.batch["response_mask"][0, 2:4] = 0
    try:
        manager(multi_turn)
        out["batch_form"]["multi_turn_refused"] = None
    except ValueError as exc:
        out["batch_form"]["multi_turn_refused"] = str(exc)
    # A constructor keyword wins over the config: the same batch with beta_c = 0.5 (Eq. 7).
    mixed = TokenRewardManager(config=cfg, tokenizer=tokenizer, beta_c=0.5)
    out["batch_form"]["mixed_reward_tensor"] = mixed(batch).tolist()
    seconds["batch_form"] = time.monotonic() - started

    # 2. verl 0.9.1's reward loop: RewardLoopManager on a local Ray, one RewardLoopWorker
    # process, which loads the manager from the same config and awaits its run_single per row.
    started = time.monotonic()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network here
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        colocated = colocated_batch(tokenizer, rows)
        scored = RewardLoopManager(cfg).compute_rm_score(colocated)
    finally:
        ray.shutdown()
    reward_tensor, extra = extract_reward(scored)  # what the trainer takes as token_level_scores
    width = colocated.batch["prompts"].shape[1]
    out["reward_loop"] = {
        "prompt_attention": colocated.batch["attention_mask"][:, :width].tolist(),
        "rm_scores": reward_tensor.tolist(),
        "reward_extra_info": {k: np.asarray(v).tolist() for k, v in extra.items()},
    }
    seconds["reward_loop"] = time.monotonic() - started

    # 3. The scalar form: custom_reward_function, called by verl's reward-loop naive manager
    # (the default), whose float verl's agent loop puts on the last response token.
    started = time.monotonic()
    scalar_cfg = config(scalar_overrides(url, tokenizer_dir))
    naive = load_reward_manager(scalar_cfg, tokenizer)
    direct_fn = get_custom_reward_fn(scalar_cfg)
    scalar: dict[str, list[Any]] = {"texts": [], "naive": [], "direct": [], "rm_scores": []}
    for (prompt, _, _), (prompt_ids, response_ids) in zip(SAMPLES, rows, strict=True):
        if not response_ids:
            continue
        one = agent_loop_batch(tokenizer, [(prompt_ids, response_ids)])
        one.non_tensor_batch = {
            "data_source": np.array(["tokenreward"], dtype=object),
            "reward_model": np.array([{"ground_truth": ""}], dtype=object),
            "extra_info": np.array([{"question": prompt}], dtype=object),
        }
        result = naive.loop.run_until_complete(naive.run_single(one))
        text = tokenizer.decode(response_ids, skip_special_tokens=True)
        loop_output = AgentLoopOutput(
            prompt_ids=prompt_ids,
            response_ids=response_ids,
            response_mask=[1] * len(response_ids),
            reward_score=result["reward_score"],
            metrics=AgentLoopMetrics(),
        )
        scalar["texts"].append({"prompt": prompt, "response": text})
        scalar["naive"].append(result["reward_score"])
        scalar["direct"].append(
            direct_fn(
                data_source="tokenreward",
                solution_str=text,
                ground_truth="",
                extra_info={"question": prompt},
            )
        )
        scalar["rm_scores"].append(loop_output.as_dict()["rm_scores"].tolist())
    out["scalar"] = {"manager": type(naive).__name__, **scalar}

    # 4. The agent loop keeps one float per sample: a per-token reward_score is refused there.
    dense = AgentLoopOutput(
        prompt_ids=[1], response_ids=[2, 3], response_mask=[1, 1], metrics=AgentLoopMetrics()
    )
    dense.reward_score = [0.1, 0.2]  # what TokenRewardManager.run_single returns
    try:
        dense.as_dict()
        out["agent_loop_refuses_token_rewards"] = None
    except Exception as exc:
        out["agent_loop_refuses_token_rewards"] = f"{type(exc).__name__}: {exc}"
    seconds["scalar"] = time.monotonic() - started
    seconds["total"] = time.monotonic() - begun
    out["seconds"] = seconds
    print(json.dumps(out))


if __name__ == "__main__":
    main()
