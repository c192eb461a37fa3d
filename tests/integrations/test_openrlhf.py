"""OpenRLHF 0.11.2's own code against a live server: its remote-RM client and its
``compute_reward`` (see scripts/openrlhf_check.py for what stands in and why: the package's
CUDA-only requirements, deepspeed and flash-attn, cannot be installed here)."""

from __future__ import annotations

from pathlib import Path

from tests.integrations.conftest import run_in
from tokenreward_service.bench.runner import SpawnedServer


def test_openrlhf_remote_rm_and_dense_compute_reward(
    llama3_server: tuple[SpawnedServer, Path],
) -> None:
    server, tokenizer = llama3_server
    report = run_in("openrlhf", "openrlhf_check.py", server.url, str(tokenizer), "llama3")
    assert report["equal_to_compute_reward_on_random_batches"] == 200
    assert len(report["rollout_rewards"]) == 4
    assert report["policy_tokens_rewarded"] > 20
    assert "/.venvs/openrlhf/" in report["openrlhf"]
    assert report["refused_reward"] is None  # OpenRLHF drops it after 5 tries
