from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

# Session-scoped servers of tiny RMs with real tokenizers, for the chat and policy-token tests.
from tests.api.chat_support import demo_rm, llama_rm, policy_dirs, sp_rm  # noqa: F401
from tests.support import LiveServer
from tokenreward_service.config import Settings
from tokenreward_service.loading import load_reward_model


@pytest.fixture(scope="module")
def server(llama_dir: Path) -> Iterator[LiveServer]:
    """A real uvicorn on 127.0.0.1 serving the tiny Llama RM with small, testable limits."""
    settings = Settings(max_items_per_request=64, max_request_bytes=64 * 1024)
    model = load_reward_model(llama_dir, device="cpu", dtype="float32", max_length=200)
    with LiveServer(settings, model=model) as live:
        yield live
