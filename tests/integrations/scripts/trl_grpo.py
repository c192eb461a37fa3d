"""Two optimizer steps of TRL's real ``GRPOTrainer`` with ``trl_reward_func`` (in ``.venvs/trl``).

Run by ``tests/integrations/test_trl.py``; it prints one JSON line: for each run (a standard
text dataset, a conversational one, and the conversational one again against a server that
cannot render chat, whose error ends the run), every call TRL made to the reward function (the
keyword names, what it passed, what the function returned), TRL's ``log_history``, the final
``global_step`` and how far the policy's weights moved. The checks against the service are the
test's, made independently from the project's own environment.

The policy is a tiny random Llama saved with ``save_pretrained`` beside the demo RM's tokenizer
(byte-level BPE, 4,096 tokens) and loaded back by TRL itself from that folder.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing reaches the hub

import argparse
import json
import time
from pathlib import Path
from typing import Any

TWEETS = [
    "the weather today",
    "my new phone",
    "just watched the game",
    "monday morning traffic",
    "finally friday",
    "this coffee shop",
    "the concert last night",
    "my flight got",
]
POLICY_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def save_policy(folder: Path, tokenizer_dir: str, seed: int, chat: bool) -> None:
    """A tiny random causal LM of the tokenizer's vocabulary, and the tokenizer, in FOLDER."""
    import transformers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer.pad_token is not None, "TRL pads prompts"
    if chat:
        tokenizer.chat_template = POLICY_TEMPLATE
    transformers.set_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def recorded(func: Any, calls: list[dict[str, Any]]) -> Any:
    """FUNC, recording each call TRL makes; it keeps ``__name__``, which TRL logs it under."""

    def wrapper(**kwargs: Any) -> Any:
        out = func(**kwargs)
        calls.append(
            {
                "kwargs": sorted(kwargs),
                "prompts": kwargs["prompts"],
                "completions": kwargs["completions"],
                "completion_ids": [list(ids) for ids in kwargs["completion_ids"]],
                "global_step": kwargs["trainer_state"].global_step,
                "returned": list(out),
            }
        )
        return out

    wrapper.__name__ = func.__name__
    return wrapper


def train(
    name: str, chat: bool, url: str, out: Path, rm_tokenizer_dir: str, seed: int
) -> dict[str, Any]:
    """Two GRPO steps; a reward function's error ends the run and is reported, not raised."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from tokenreward import RewardClient
    from tokenreward.integrations.trainers import trl_reward_func

    policy_dir = out / name / "policy"
    save_policy(policy_dir, rm_tokenizer_dir, seed, chat)
    if chat:
        prompts: list[Any] = [
            [{"role": "system", "content": "You write tweets."}, {"role": "user", "content": t}]
            for t in TWEETS
        ]
    else:
        prompts = list(TWEETS)
    # An extra column: TRL passes every dataset column to reward functions as a keyword.
    dataset = Dataset.from_dict({"prompt": prompts, "topic": [f"t{i}" for i in range(len(TWEETS))]})
    generation: dict[str, Any] = {}
    if chat:
        # EOS made likely from the first token on (e^7.9 against 4,095 logits near 0: about
        # 40 % a token), so some completions are empty: the function's None, TRL's "unscorable".
        generation = {"sequence_bias": [[[2], 7.9]]}
    config = GRPOConfig(
        output_dir=str(out / name / "trainer"),
        max_steps=2,
        per_device_train_batch_size=8,
        num_generations=2,
        max_completion_length=12,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_vllm=False,
        bf16=False,
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
        generation_kwargs=generation,
    )
    rm_tokenizer = AutoTokenizer.from_pretrained(rm_tokenizer_dir)
    calls: list[dict[str, Any]] = []
    with RewardClient(url) as client:
        reward = recorded(trl_reward_func(client, rm_tokenizer), calls)
        trainer = GRPOTrainer(
            model=str(policy_dir), reward_funcs=[reward], args=config, train_dataset=dataset
        )
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        started = time.monotonic()
        error = None
        try:
            trainer.train()
        except Exception as exc:
            error = {"type": type(exc).__name__, "module": type(exc).__module__, "text": str(exc)}
        elapsed = time.monotonic() - started
    moved = {
        n: (p.detach() - before[n]).abs().max().item() for n, p in trainer.model.named_parameters()
    }
    policy_tokenizer = trainer.processing_class
    decoded = [
        policy_tokenizer.decode(ids, skip_special_tokens=True)
        for call in calls
        for ids in call["completion_ids"]
    ]
    return {
        "error": error,
        "global_step": trainer.state.global_step,
        "train_seconds": elapsed,
        "reward_func_names": trainer.reward_func_names,
        "eos_token_id": policy_tokenizer.eos_token_id,
        "decoded_completion_ids": decoded,
        "max_weight_change": max(moved.values()),
        "weights_changed": sum(1 for v in moved.values() if v > 0),
        "weights": len(moved),
        "calls": calls,
        "log_history": trainer.state.log_history,
    }


def main() -> None:
    import torch
    import transformers
    import trl

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True, help="the service, for the standard dataset")
    parser.add_argument("--chat-url", required=True, help="the service with a chat template")
    parser.add_argument("--rm-tokenizer", required=True, help="the RM's tokenizer folder")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result: dict[str, Any] = {
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "trl_file": trl.__file__,
    }
    runs = [
        ("standard", False, args.url),
        ("conversational", True, args.chat_url),
        ("refused", True, args.url),  # chat prompts, but this server has no chat template
    ]
    for name, chat, url in runs:
        result[name] = train(name, chat, url, args.out, args.rm_tokenizer, args.seed)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
