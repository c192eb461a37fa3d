"""Adapters between tokenreward and RL training stacks.

Each module imports its framework lazily, inside the functions that need it, so every adapter
is importable (and type-checkable) without vLLM, torch, numpy or TRL installed.

- :mod:`tokenreward.integrations.vllm`: vLLM ``RequestOutput`` lists -> items, results back.
- :mod:`tokenreward.integrations.learner`: padded dense reward tensors, the PPO reward of Eq. 8.
- :mod:`tokenreward.integrations.trainers`: scalar reward functions for OpenRLHF and TRL.
- :mod:`tokenreward.integrations.openrlhf`: per-token rewards in OpenRLHF's ``compute_reward``.
- :mod:`tokenreward.integrations.skyrl`: a SkyRL generator wrapper with per-token rewards.
- :mod:`tokenreward.integrations.verl`: a verl reward manager giving verl's reward tensor one
  reward per policy response token, and verl's scalar ``compute_score``.
"""
