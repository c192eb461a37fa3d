"""The serving layer: wire requests in, per-token rewards out, no HTTP.

Text items are first tokenized with the RM's own tokenizer. It checks each item against the
loaded model (vocabulary, length, baseline), lays out
``prompt | response | suffix``, sends the sequences through the batcher, and redistributes the
prefix scores with the request's ``beta_c`` and ``baseline``. Errors are domain errors naming
the offending item; the HTTP edge maps them to statuses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tokenreward.protocol import (
    ModelInfo,
    ModelRef,
    RewardItem,
    RewardRequest,
    RewardResponse,
    RewardResult,
)
from tokenreward_service.batching import Batcher, Job
from tokenreward_service.errors import DeadlineExceeded, InternalError, InvalidRequest
from tokenreward_service.model import ModelSpec
from tokenreward_service.redistribution import redistribute

__all__ = ["ResultObserver", "RewardService"]


class ResultObserver:
    """What the service reports about its outputs (metrics implement it; tests may too)."""

    def observe_results(
        self, scores: torch.Tensor, prompt_scores: torch.Tensor, rewards: torch.Tensor
    ) -> None:
        """Scores ``[B]``, prompt scores ``[B]`` (NaN: empty prompt), token rewards (flat)."""

    def observe_nonfinite(self, items: int) -> None:
        """``items`` items came out NaN or infinite."""


@dataclass(frozen=True)
class Tokenized:
    """An item as token IDs, with the response's token texts and spans when it came as text."""

    prompt_ids: list[int]
    response_ids: list[int]
    response_tokens: list[str] | None = None
    response_offsets: list[tuple[int, int]] | None = None


def tokenize_items(tokenizer: Any, items: Sequence[RewardItem]) -> list[Tokenized]:
    """Token IDs of every item; text items go through the RM's tokenizer (the prompt with its
    special tokens, e.g. BOS; the response without), with character offsets for the response."""
    out: list[Tokenized] = []
    for index, item in enumerate(items):
        if item.prompt_ids is not None and item.response_ids is not None:
            out.append(Tokenized(item.prompt_ids, item.response_ids))
            continue
        if tokenizer is None:
            raise InvalidRequest(
                "this model has no tokenizer, so items must carry prompt_ids and response_ids",
                item=index,
            )
        assert item.prompt is not None
        assert item.response is not None
        prompt_ids = list(tokenizer(item.prompt, add_special_tokens=True)["input_ids"])
        encoded = tokenizer(item.response, add_special_tokens=False, return_offsets_mapping=True)
        response_ids = list(encoded["input_ids"])
        if not response_ids:
            raise InvalidRequest("the response text tokenizes to no tokens", item=index)
        offsets = [(int(a), int(b)) for a, b in encoded["offset_mapping"]]
        tokens = [item.response[a:b] for a, b in offsets]
        out.append(Tokenized(prompt_ids, response_ids, tokens, offsets))
    return out


class RewardService:
    """Adapts the wire protocol to the batcher and the redistribution math."""

    def __init__(
        self,
        spec: ModelSpec,
        batcher: Batcher,
        *,
        timeout_s: float,
        tokenizer: Any | None = None,
        observer: ResultObserver | None = None,
    ) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self._observer = observer
        self._batcher = batcher
        self._timeout_s = timeout_s
        self._ref = ModelRef(id=spec.id, revision=spec.revision)

    def model_info(self) -> ModelInfo:
        s = self.spec
        return ModelInfo(
            id=s.id,
            revision=s.revision,
            architecture=s.architecture,
            vocab_size=s.vocab_size,
            max_length=s.max_length,
            dtype=s.dtype,
            device=s.device,
            suffix_ids=list(s.suffix_ids),
            random_weights=s.random_weights,
        )

    def _suffix_for(self, item: Tokenized) -> tuple[int, ...]:
        """The suffix to append: none when the response already ends with it (e.g. the EOS that
        the policy generated), so that it is never read twice."""
        suffix = self.spec.suffix_ids
        if suffix and tuple(item.response_ids[-len(suffix) :]) == suffix:
            return ()
        return suffix

    def layout(self, request: RewardRequest, items: Sequence[Tokenized]) -> list[list[int]]:
        """Check every item and return its full token sequence; the first bad item is named."""
        vocab = self.spec.vocab_size
        sequences: list[list[int]] = []
        for index, item in enumerate(items):
            if request.baseline == "prompt" and not item.prompt_ids:
                raise InvalidRequest(
                    "prompt_ids is empty, but baseline 'prompt' reads the score at the last "
                    "prompt token; send a prompt or use baseline 'zero'",
                    item=index,
                )
            for name, ids in (("prompt_ids", item.prompt_ids), ("response_ids", item.response_ids)):
                if ids and (min(ids) < 0 or max(ids) >= vocab):
                    bad = next(t for t in ids if not 0 <= t < vocab)
                    raise InvalidRequest(
                        f"{name} holds token id {bad}, outside the vocabulary [0, {vocab})",
                        item=index,
                    )
            suffix = self._suffix_for(item)
            sequence = [*item.prompt_ids, *item.response_ids, *suffix]
            if len(sequence) > self.spec.max_length:
                raise InvalidRequest(
                    f"sequence of {len(sequence)} tokens (prompt {len(item.prompt_ids)}, response "
                    f"{len(item.response_ids)}, suffix {len(suffix)}) exceeds the maximum length "
                    f"{self.spec.max_length}; it is not truncated",
                    item=index,
                )
            sequences.append(sequence)
        return sequences

    async def rewards(self, request: RewardRequest) -> RewardResponse:
        if any(item.is_text for item in request.items):
            items = await asyncio.to_thread(tokenize_items, self.tokenizer, request.items)
        else:
            items = tokenize_items(None, request.items)
        sequences = self.layout(request, items)
        jobs = [Job(seq, len(item.prompt_ids)) for seq, item in zip(sequences, items, strict=True)]
        try:
            scores = await asyncio.wait_for(
                self._batcher.submit(jobs, timeout_s=self._timeout_s), self._timeout_s
            )
        except asyncio.TimeoutError:
            raise DeadlineExceeded(
                f"the request did not finish within its {self._timeout_s:g} s deadline"
            ) from None
        return self._results(request, items, sequences, scores)

    def _results(
        self,
        request: RewardRequest,
        items: Sequence[Tokenized],
        sequences: Sequence[Sequence[int]],
        scores: list[torch.Tensor],
    ) -> RewardResponse:
        width = max(len(seq) for seq in sequences)
        padded = torch.zeros((len(scores), width), dtype=torch.float32)
        for row, row_scores in enumerate(scores):
            padded[row, : row_scores.shape[0]] = row_scores
        out = redistribute(
            padded,
            torch.tensor([len(it.prompt_ids) for it in items]),
            torch.tensor([len(it.response_ids) for it in items]),
            torch.tensor([len(seq) for seq in sequences]),
            beta_c=request.beta_c,
            baseline=request.baseline,
        )
        finite = torch.isfinite(torch.where(out.response_mask, out.token_rewards, 0.0)).all(dim=1)
        finite &= torch.isfinite(out.score)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0, 0])
            if self._observer is not None:
                self._observer.observe_nonfinite(int((~finite).sum()))
            raise InternalError("the model produced a non-finite score", item=bad)
        if self._observer is not None:
            self._observer.observe_results(
                out.score, out.prompt_score, out.token_rewards[out.response_mask]
            )
        rewards = out.token_rewards.tolist()
        prefixes = out.prefix_scores.tolist() if request.return_prefix_scores else None
        score = out.score.tolist()
        prompt_score = out.prompt_score.tolist()
        results = []
        for row, (wire, item) in enumerate(zip(request.items, items, strict=True)):
            n = len(item.response_ids)
            p = prompt_score[row]
            results.append(
                RewardResult(
                    id=wire.id,
                    token_rewards=rewards[row][:n],
                    score=score[row],
                    prompt_score=None if p != p else p,  # NaN: empty prompt
                    prefix_scores=None if prefixes is None else prefixes[row][:n],
                    response_tokens=item.response_tokens,
                    response_offsets=item.response_offsets,
                )
            )
        return RewardResponse(model=self._ref, results=results)
