"""The host's torch threads (tokenreward_service.app.host_threads)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tokenreward_service.app import host_threads
from tokenreward_service.model import ModelSpec


def spec(device: str) -> ModelSpec:
    return ModelSpec(
        id="m",
        revision="r",
        architecture="LlamaForSequenceClassification",
        vocab_size=10,
        max_length=16,
        dtype="float32",
        device=device,
        suffix_ids=(),
        random_weights=True,
    )


@pytest.fixture
def threads() -> Iterator[int]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield before
    torch.set_num_threads(before)


def test_a_model_on_an_accelerator_leaves_the_host_one_torch_thread(threads: int) -> None:
    host_threads(spec("cuda:0"))
    assert torch.get_num_threads() == 1


def test_a_model_on_the_cpu_keeps_its_intra_op_threads(threads: int) -> None:
    host_threads(spec("cpu"))
    assert torch.get_num_threads() == 2
