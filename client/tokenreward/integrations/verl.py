"""verl: per-token rewards from the service as verl's ``[batch, response_length]`` reward tensor.

verl hands a reward manager a ``DataProto`` whose ``batch`` holds ``prompts`` ``[B, P]``,
``responses`` ``[B, R]`` and ``attention_mask`` ``[B, P + R]`` (policy token IDs). Its agent loop
left-pads the prompts and right-pads the responses; its colocated reward path (0.9) rebuilds the
prompts right-padded. :class:`TokenRewardManager` therefore finds each row's real tokens through
the attention mask only, never by assuming a padding side, sends them to the service with the
policy tokenizer's name (one reward comes back per *policy* response token), and writes the
rewards on exactly the positions of those tokens: the first ``len(response)`` columns, zeros on
padding. That tensor is what verl calls ``rm_scores``, then ``token_level_scores``, then (less
the KL penalty) ``token_level_rewards`` for GAE.

Two verl interfaces, one class, duck-typed (verl is never imported, so this module loads
without verl or torch; torch is imported when a batch is scored):

- the batch form ``manager(data, return_dict=False)`` of verl's ``AbstractRewardManager``;
- verl 0.9's reward loop: ``run_single(data)`` (one row, awaited by verl's ``RewardLoopWorker``)
  and ``assemble_rm_scores(data, scores)`` (verl's ``RewardLoopManager.compute_rm_score`` lays
  the rows' scores into ``rm_scores`` with it: here densely, one reward per token).

verl 0.9 constructs it from its config (``reward.reward_manager.source=importlib``,
``module.path=pkg://tokenreward.integrations.verl``, ``name=TokenRewardManager``) and passes the
whole config: the settings are read from ``reward.reward_kwargs`` (``url``, ``policy_tokenizer``,
``beta_c``, ``baseline``, ``api_key``, ``timeout``), and constructor keywords of the same names
win over them. :func:`compute_score` is the scalar form for ``custom_reward_function``.

Where verl 0.9.1 takes a ``[B, R]`` tensor from a reward manager: ``RewardLoopManager.
compute_rm_score`` (through ``assemble_rm_scores``), which its PPO trainers call only on the
colocated reward-model path (``reward.reward_model.enable=True``). Without a reward model the
trainers score each sample inside the agent loop, which holds one float per sample
(``AgentLoopOutput.reward_score``) and raises on a list of token rewards: there, use the scalar
:func:`compute_score`, whose score verl puts on the last response token.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any, get_args

from tokenreward._client import RewardClient
from tokenreward.protocol import Baseline, RewardResult

__all__ = ["TokenRewardManager", "compute_score"]

_SETTINGS = ("url", "policy_tokenizer", "beta_c", "baseline", "api_key", "timeout")
_VERL_ARGUMENTS = frozenset(
    {"reward_router_address", "reward_model_tokenizer", "num_examine", "reward_fn_key"}
)
"""What verl's loaders pass to every reward manager and this one has no use for: the address
of verl's own RM router (this manager has its own service), and the legacy loader's arguments."""


def _get(container: Any, key: str) -> Any:
    """``container[key]`` of a mapping (an OmegaConf ``DictConfig`` is one), else None."""
    if isinstance(container, Mapping):
        return container.get(key)
    return None


def _urls(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and value and all(isinstance(u, str) for u in value):
        return list(value)
    raise ValueError(f"url must be a URL or a list of URLs, got {value!r}")


def _real_tokens(data: Any) -> tuple[Any, list[tuple[list[int], list[int]]]]:
    """The ``[B, R]`` bool mask of real response tokens, and each row's real prompt and response
    token IDs, read through ``attention_mask`` (either padding side works)."""
    prompts, responses = data.batch["prompts"], data.batch["responses"]
    attention = data.batch["attention_mask"]
    width, length = prompts.shape[-1], responses.shape[-1]
    if attention.shape[-1] != width + length:
        raise ValueError(
            f"attention_mask has {attention.shape[-1]} columns; prompts + responses have "
            f"{width} + {length}"
        )
    prompt_mask = attention[:, :width].bool()
    response_mask = attention[:, width:].bool()
    if "response_mask" in data.batch:
        # verl's response_mask is 0 on tool output inside a multi-turn response, and its GAE
        # drops the rewards there: refuse rather than lose them.
        gaps = (data.batch["response_mask"].bool() != response_mask).any(dim=-1)
        if bool(gaps.any()):
            bad = gaps.nonzero().flatten().tolist()
            raise ValueError(
                f"rows {bad}: response tokens outside verl's response_mask (tool output in a "
                "multi-turn response); verl's GAE would drop their rewards"
            )
    rows = [
        (prompts[i][prompt_mask[i]].tolist(), responses[i][response_mask[i]].tolist())
        for i in range(prompts.shape[0])
    ]
    return response_mask, rows


def _dense(response_mask: Any, rows: Sequence[Sequence[float]]) -> Any:
    """``[B, R]`` float32 zeros with row ``i``'s rewards on its real response tokens, in order."""
    import torch

    if len(rows) != response_mask.shape[0]:
        raise ValueError(f"{len(rows)} rows of rewards for a batch of {response_mask.shape[0]}")
    out = torch.zeros(response_mask.shape, dtype=torch.float32, device=response_mask.device)
    for i, rewards in enumerate(rows):
        if not isinstance(rewards, Sequence):
            raise TypeError(
                f"row {i}: expected one reward per response token, got {type(rewards).__name__} "
                "(a scalar score belongs to another reward manager)"
            )
        count = int(response_mask[i].sum())
        if len(rewards) != count:
            raise ValueError(f"row {i}: {len(rewards)} rewards for {count} response tokens")
        out[i, response_mask[i]] = torch.tensor(list(rewards), dtype=out.dtype, device=out.device)
    return out


def _info(result: RewardResult | None) -> dict[str, float]:
    """A row's extra info for verl's logs: the holistic score and the prompt's (NaN: none)."""
    if result is None:
        return {"score": math.nan, "prompt_score": math.nan}
    prompt = result.prompt_score
    return {"score": result.score, "prompt_score": math.nan if prompt is None else prompt}


class TokenRewardManager:
    """A verl reward manager whose rewards are the service's, one per policy response token.

    ``url`` (one URL or a list of replicas), ``policy_tokenizer`` (the name the server was
    started with, ``--policy-tokenizer NAME=PATH``; leave it unset only when the policy and the
    RM share a vocabulary), ``beta_c`` and ``baseline`` (as in ``RewardClient.rewards``),
    ``api_key`` and ``timeout`` (seconds for one scoring call, retries included). An unknown
    setting is an error, so a misspelt ``policy_tokenizer`` cannot quietly score policy IDs as
    RM IDs. A row without response tokens gets zeros, and NaN as its score in the extra info.
    ``tokenizer`` and ``compute_score``, which verl passes to every manager, are not used: the
    service reads the token IDs with the policy tokenizer it loaded.
    """

    def __init__(
        self,
        config: Any = None,
        tokenizer: Any = None,
        compute_score: Any = None,
        *,
        url: str | Sequence[str] | None = None,
        policy_tokenizer: str | None = None,
        beta_c: float | None = None,
        baseline: Baseline | None = None,
        api_key: str | None = None,
        timeout: float | None = None,
        **verl_arguments: Any,
    ) -> None:
        unknown = sorted(set(verl_arguments) - _VERL_ARGUMENTS)
        if unknown:
            raise TypeError(f"unknown TokenRewardManager settings: {', '.join(unknown)}")
        settings = dict(_get(_get(config, "reward"), "reward_kwargs") or {})
        unknown = sorted(set(settings) - set(_SETTINGS))
        if unknown:
            raise ValueError(
                f"unknown settings in reward.reward_kwargs: {', '.join(map(str, unknown))} "
                f"(known: {', '.join(_SETTINGS)})"
            )
        given = {
            "url": url,
            "policy_tokenizer": policy_tokenizer,
            "beta_c": beta_c,
            "baseline": baseline,
            "api_key": api_key,
            "timeout": timeout,
        }
        settings.update({key: value for key, value in given.items() if value is not None})
        if settings.get("url") is None:
            raise ValueError(
                "TokenRewardManager needs the service's url: set reward.reward_kwargs.url"
            )
        if settings.get("baseline", "prompt") not in get_args(Baseline):
            raise ValueError(f"baseline must be one of {get_args(Baseline)}")
        self.policy_tokenizer: str | None = settings.get("policy_tokenizer")
        self.beta_c = float(settings.get("beta_c", 1.0))
        self.baseline: Baseline = settings.get("baseline", "prompt")
        options: dict[str, Any] = {"api_key": settings.get("api_key")}
        if settings.get("timeout") is not None:
            options["timeout"] = float(settings["timeout"])
        self.client = RewardClient(_urls(settings["url"]), **options)

    def close(self) -> None:
        self.client.close()

    def score(self, rows: Sequence[tuple[list[int], list[int]]]) -> list[RewardResult | None]:
        """The service's result for each ``(prompt_ids, response_ids)`` row, in one call; None
        for a row without response tokens (there is nothing to reward)."""
        todo = [i for i, (_, response) in enumerate(rows) if response]
        out: list[RewardResult | None] = [None] * len(rows)
        if todo:
            results = self.client.rewards(
                [rows[i] for i in todo],
                beta_c=self.beta_c,
                baseline=self.baseline,
                policy_tokenizer=self.policy_tokenizer,
            )
            for i, result in zip(todo, results, strict=True):
                out[i] = result
        return out

    def __call__(self, data: Any, return_dict: bool = False) -> Any:
        """verl's batch form: the ``[B, R]`` float32 reward tensor, or with ``return_dict``
        ``{"reward_tensor": ..., "reward_extra_info": {"score": [...], "prompt_score": [...]}}``."""
        response_mask, rows = _real_tokens(data)
        results = self.score(rows)
        tensor = _dense(response_mask, [r.token_rewards if r else [] for r in results])
        if not return_dict:
            return tensor
        infos = [_info(r) for r in results]
        extra = {key: [info[key] for info in infos] for key in ("score", "prompt_score")}
        return {"reward_tensor": tensor, "reward_extra_info": extra}

    async def run_single(self, data: Any) -> dict[str, Any]:
        """verl 0.9's reward loop: score one trajectory (its last row, as verl's own managers
        do). ``reward_score`` is the list of token rewards, which only
        :meth:`assemble_rm_scores` can lay out: verl's agent loop, which keeps one float per
        sample, raises on it rather than keep a collapsed reward."""
        _, rows = _real_tokens(data[-1:])
        loop = asyncio.get_running_loop()
        [result] = await loop.run_in_executor(None, self.score, rows)
        return {
            "reward_score": list(result.token_rewards) if result else [],
            "reward_extra_info": _info(result),
        }

    @classmethod
    def assemble_rm_scores(cls, data: Any, scores: Sequence[Sequence[float]]) -> Any:
        """verl 0.9's ``RewardLoopManager.compute_rm_score`` calls this with each row's
        ``reward_score``; the rewards go on the real response tokens, zeros elsewhere."""
        response_mask, _ = _real_tokens(data)
        return _dense(response_mask, scores)


_clients: dict[tuple[tuple[str, ...], str | None, float | None], RewardClient] = {}
_clients_lock = threading.Lock()


def _shared_client(urls: list[str], api_key: str | None, timeout: float | None) -> RewardClient:
    """One client per setting, shared by every call: verl calls :func:`compute_score` once per
    sample, from its executor's threads (the client is thread-safe)."""
    key = (tuple(urls), api_key, timeout)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            options: dict[str, Any] = {"api_key": api_key}
            if timeout is not None:
                options["timeout"] = timeout
            client = _clients[key] = RewardClient(urls, **options)
        return client


def compute_score(
    data_source: Any = None,
    solution_str: str = "",
    ground_truth: Any = None,
    extra_info: Mapping[str, Any] | None = None,
    *,
    url: str | Sequence[str] | None = None,
    prompt_key: str = "question",
    api_key: str | None = None,
    timeout: float | None = None,
    **_: Any,
) -> float:
    """verl's scalar reward function (``custom_reward_function``): the RM's holistic score of
    the response text after the prompt, which verl puts on the last response token.

    verl passes the decoded response but not the prompt: the prompt is read from
    ``extra_info[prompt_key]`` (verl's example datasets keep the question there), as text or a
    list of chat turns. The settings come from ``custom_reward_function.reward_kwargs``. An
    empty response scores 0.0.
    """
    if url is None:
        raise ValueError("compute_score needs the service's url: set reward_kwargs.url")
    prompt = (extra_info or {}).get(prompt_key)
    if prompt is None:
        raise ValueError(f"extra_info has no {prompt_key!r}: the prompt the response answers")
    if not solution_str:
        return 0.0
    item: dict[str, Any] = {"response": solution_str}
    if isinstance(prompt, str):
        item["prompt"] = prompt
    else:
        item["messages"] = [{"role": m["role"], "content": m["content"]} for m in prompt]
    [result] = _shared_client(_urls(url), api_key, timeout).rewards([item])
    return result.score
