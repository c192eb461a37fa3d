"""Engines for the engine-process tests, importable by the spawned engine process.

``ScriptedEngine`` stands in for a model where the tests need to steer the forward pass from
another process: each sequence's scores are the running sum of its token IDs (exact, and they
identify the sequence), every batch's first tokens are logged to a file, and a batch holding
:data:`HOLD` waits until the test creates the ``release`` file (the engine polls for it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from tokenreward_service.model import BatchScores, ModelSpec

HOLD = 7
"""A sequence starting with this token holds its batch until ``release`` exists."""


class ScriptedEngine:
    def __init__(self, folder: str, *, fail_load: bool = False) -> None:
        if fail_load:
            raise RuntimeError("no weights in this folder")
        self.folder = Path(folder)
        self.tokenizer = None
        self.spec = ModelSpec(
            id="scripted",
            revision="sha256:0",
            architecture="ScriptedEngine",
            vocab_size=1000,
            max_length=4096,
            dtype="float32",
            device="cpu",
            suffix_ids=(),
        )

    def score_batch(
        self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]
    ) -> BatchScores:
        with (self.folder / "batches.log").open("a") as log:
            log.write(" ".join(str(seq[0]) for seq in sequences) + "\n")
        if any(seq[0] == HOLD for seq in sequences):
            while not (self.folder / "release").exists():
                time.sleep(0.005)
        rows = [torch.cumsum(torch.tensor(list(seq), dtype=torch.float32), 0) for seq in sequences]
        tokens = sum(len(seq) for seq in sequences)
        return BatchScores(scores=rows, computed_tokens=tokens, real_tokens=tokens, shared_items=0)


def scripted(folder: str, fail_load: bool = False) -> ScriptedEngine:
    return ScriptedEngine(folder, fail_load=fail_load)
