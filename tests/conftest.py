from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import hypothesis  # noqa: F401  (imported up front: its pytest plugin otherwise imports it late,
import pytest  # inside a hook, where CPython 3.11.7's parser can fail with "AST constructor

#                recursion depth mismatch")
from tokenreward_service.model import RewardModel, load_reward_model
from tokenreward_service.tiny import save_tiny_reward_model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: a tiny random RM of an architecture, saved once per session with save_pretrained."""
    cache: dict[tuple[object, ...], Path] = {}

    def make(architecture: str = "llama", seed: int = 0, **sizes: object) -> Path:
        key = (architecture, seed, *sorted(sizes.items()))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"rm-{architecture}")
            cache[key] = save_tiny_reward_model(folder, architecture, seed=seed, **sizes)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def llama_dir(model_dir: Callable[..., Path]) -> Path:
    return model_dir("llama", seed=7)


@pytest.fixture(scope="session")
def llama(llama_dir: Path) -> RewardModel:
    """The default test model, loaded through the real path (float32, CPU)."""
    return load_reward_model(llama_dir, device="cpu", dtype="float32")
