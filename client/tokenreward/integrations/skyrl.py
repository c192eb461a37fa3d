"""Per-token rewards for SkyRL, which takes them natively.

A SkyRL generator returns a ``GeneratorOutput`` whose ``rewards`` may be one float per response
or one list of floats per response token; the trainer keeps a token-level list as it is and
lays it out right-aligned with the response (``convert_prompts_responses_to_batch_tensors``)
for the advantage estimator. :class:`TokenRewardGenerator` wraps any SkyRL generator and
replaces (or adds to) its rewards with the service's, for the policy's own tokens
(``--policy-tokenizer NAME=DIR`` on the server). Return it from your experiment's
``get_generator``. Neither SkyRL nor torch is imported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from tokenreward._client import AsyncRewardClient
from tokenreward.protocol import RewardItem

__all__ = ["TokenRewardGenerator", "token_rewards"]


class Generator(Protocol):
    async def generate(self, input_batch: Any) -> Any: ...


async def token_rewards(
    client: AsyncRewardClient,
    prompt_token_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    policy_tokenizer: str,
    beta_c: float = 1.0,
    loss_masks: Sequence[Sequence[int]] | None = None,
) -> list[list[float]]:
    """One reward per response token of every sample, from the service.

    With ``loss_masks`` (SkyRL's), a response whose mask has zeros (multi-turn, with
    environment observations inside the response) is refused: RED would credit the
    observation tokens too.
    """
    if loss_masks is not None:
        for row, mask in enumerate(loss_masks):
            if not all(mask):
                raise ValueError(
                    f"sample {row}'s loss mask has zeros (observation tokens inside the "
                    "response, multi-turn): per-token rewards cover single-turn responses only"
                )
    items = [
        RewardItem(prompt_ids=list(prompt), response_ids=list(response))
        for prompt, response in zip(prompt_token_ids, response_ids, strict=True)
    ]
    results = await client.rewards(items, beta_c=beta_c, policy_tokenizer=policy_tokenizer)
    return [list(result.token_rewards) for result in results]


class TokenRewardGenerator:
    """A SkyRL generator whose ``rewards`` are the service's per-token rewards.

    ``keep_env_rewards``: add the inner generator's own rewards (the environment's: a float on
    the last token, or per token) to the service's instead of replacing them.
    """

    def __init__(
        self,
        inner: Generator,
        client: AsyncRewardClient,
        *,
        policy_tokenizer: str,
        beta_c: float = 1.0,
        keep_env_rewards: bool = False,
    ) -> None:
        self.inner = inner
        self.client = client
        self.policy_tokenizer = policy_tokenizer
        self.beta_c = beta_c
        self.keep_env_rewards = keep_env_rewards

    async def generate(self, input_batch: Any) -> Any:
        output = await self.inner.generate(input_batch)
        dense = await token_rewards(
            self.client,
            output["prompt_token_ids"],
            output["response_ids"],
            policy_tokenizer=self.policy_tokenizer,
            beta_c=self.beta_c,
            loss_masks=output.get("loss_masks"),
        )
        if self.keep_env_rewards:
            for row, env in zip(dense, output["rewards"], strict=True):
                if isinstance(env, list):
                    for t, value in enumerate(env):
                        row[t] += float(value)
                else:
                    row[-1] += float(env)
        output["rewards"] = dense
        return output
