"""SkyRL 0.3.0's own code against a live server: our generator wrapper's per-token rewards as
SkyRL lays them out for its trainer (see scripts/skyrl_check.py for the one stand-in)."""

from __future__ import annotations

from pathlib import Path

from tests.integrations.conftest import run_in
from tokenreward_service.bench.runner import SpawnedServer


def test_skyrl_generator_rewards_per_policy_token(
    llama3_server: tuple[SpawnedServer, Path],
) -> None:
    server, tokenizer = llama3_server
    report = run_in("skyrl", "skyrl_check.py", server.url, str(tokenizer), "llama3")
    assert "loss mask has zeros" in report["multi_turn_refused"]
    assert report["token_rewards"] > 20
    assert len(set(report["scores"])) == 3
