"""Per-token rewards in OpenRLHF's PPO: the replacement for its ``compute_reward``.

OpenRLHF's remote RM (``--reward.remote_url http://HOST:PORT/get_reward``, served by
``tokenreward serve``) gives one scalar per sample, which ``compute_reward``
(``openrlhf/models/utils.py``) places on the last response token before GAE. With the two
functions here the learner uses the service's per-token rewards instead:

- :func:`token_rewards` sends each experience's policy tokens (``sequences``, with its
  ``attention_mask`` and ``action_mask``) to the service under the policy tokenizer the server
  loaded (``--policy-tokenizer NAME=DIR``) and lays the rewards out like ``action_mask``;
- :func:`dense_compute_reward` takes them where ``compute_reward`` takes the scalar, with the
  same KL term: on a reward that is zero but for the scalar on the last action token it returns
  exactly what ``compute_reward`` returns.

Use them with a per-token estimator (``--algo.advantage.estimator gae``, or ``reinforce``):
group estimators (``rloo``, ``group_norm``, ...) normalise the scalar across the group first,
and RED's rewards telescope to ``R(x, y) - R(x)`` anyway there. torch is imported when called.
"""

from __future__ import annotations

from typing import Any

from tokenreward._client import RewardClient
from tokenreward.protocol import RewardItem

__all__ = ["dense_compute_reward", "token_rewards"]


def token_rewards(
    client: RewardClient,
    sequences: Any,
    attention_mask: Any,
    action_mask: Any,
    *,
    policy_tokenizer: str,
    beta_c: float = 1.0,
) -> Any:
    """Per-token rewards ``[batch, seq_len - 1]`` laid out like OpenRLHF's ``action_mask``.

    ``sequences`` ``[batch, seq_len]`` are prompt and response policy token IDs (padding where
    ``attention_mask`` is 0); ``action_mask[:, t]`` marks ``sequences[:, t + 1]`` as an action
    (a response token). Each row's actions must be one contiguous span (single-turn). The
    reward of each action token is the service's, for the policy's own tokens; everything else
    is 0. Raises the client's typed errors: never a partial tensor.
    """
    import torch

    tokens = sequences.detach().cpu()
    attend = attention_mask.detach().cpu().bool()
    actions = action_mask.detach().cpu().bool()
    if actions.shape != (tokens.shape[0], tokens.shape[1] - 1):
        raise ValueError(
            f"action_mask of shape {tuple(actions.shape)} does not go with sequences of shape "
            f"{tuple(tokens.shape)}: OpenRLHF's action_mask has one column fewer"
        )
    items, spans = [], []
    for row in range(tokens.shape[0]):
        where = actions[row].nonzero().flatten()
        if where.numel() == 0:
            raise ValueError(f"row {row} has no action (response) token")
        first, last = int(where[0]), int(where[-1])
        if last - first + 1 != where.numel():
            raise ValueError(
                f"row {row}'s actions are not one contiguous span (multi-turn): not supported"
            )
        # action column t is the token at sequences[:, t + 1]
        prompt = tokens[row, : first + 1][attend[row, : first + 1]]
        response = tokens[row, first + 1 : last + 2]
        items.append(RewardItem(prompt_ids=prompt.tolist(), response_ids=response.tolist()))
        spans.append((first, last + 1))
    results = client.rewards(items, beta_c=beta_c, policy_tokenizer=policy_tokenizer)
    out = torch.zeros(actions.shape, dtype=torch.float32)
    for row, (result, (start, end)) in enumerate(zip(results, spans, strict=True)):
        out[row, start:end] = torch.tensor(result.token_rewards, dtype=torch.float32)
    return out.to(action_mask.device)


def dense_compute_reward(
    r: Any,
    kl_coef: float,
    kl: Any,
    action_mask: Any = None,
    reward_clip_range: tuple[float, float] | None = None,
) -> Any:
    """OpenRLHF's ``compute_reward`` with per-token rewards ``r`` ``[batch, actions]`` (from
    :func:`token_rewards`) in place of the scalar: ``r`` on the action tokens minus
    ``kl_coef * kl``. ``reward_clip_range`` clips each token's reward."""
    kl_coef = max(kl_coef, 0.0)
    rewards = r.to(kl.dtype)
    if reward_clip_range:
        rewards = rewards.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    if action_mask is not None:
        rewards = rewards * action_mask.to(kl.dtype)
    return rewards - kl_coef * kl
