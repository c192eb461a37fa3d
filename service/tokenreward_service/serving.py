"""The serving layer: wire requests in, per-token rewards out, no HTTP.

:mod:`tokenreward_service.conversations` turns every item form (RM token IDs, text, chat
messages, policy token IDs) into an RM token sequence ``prompt | response | suffix``; this
module checks it against the loaded model (length, baseline), sends the sequences through the
batcher, and redistributes the prefix scores with the request's ``beta_c`` and ``baseline``,
onto the caller's tokens. Errors are domain errors naming the offending item; the HTTP edge
maps them to statuses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

import torch

from tokenreward import binary
from tokenreward.protocol import (
    ModelInfo,
    ModelRef,
    RewardRequest,
    RewardResponse,
    RewardResult,
)
from tokenreward_service.alignment import step_sums
from tokenreward_service.batching import Job
from tokenreward_service.conversations import Prepared, Preparer
from tokenreward_service.errors import DeadlineExceeded, InternalError, InvalidRequest
from tokenreward_service.model import ModelSpec
from tokenreward_service.redistribution import redistribute

__all__ = [
    "INLINE_BODY_BYTES",
    "INLINE_TOKENS",
    "ResultObserver",
    "RewardService",
    "Scheduler",
    "inline",
]

INLINE_BODY_BYTES = 262_144
"""Bodies up to this size are parsed on the event loop, bigger ones on a worker thread.

Handing work to a thread is not free: the event loop then waits about a millisecond to get
the GIL back from the woken worker, and the worker's CPU time comes on top (on the simulated
1M tokens/s device, with 32-item requests of 67 KB, the hand-offs of their parsing took a
third of a core). Parsing 256 KiB of JSON token IDs takes about 4 ms: up to that, a body costs
less parsed in place, and holding the loop that long delays the others by no more than a
batch's wait. A bigger one (a 4,096-item request takes most of a second) leaves the loop, so
that it does not stall the probes and the other requests."""
INLINE_TOKENS = 65_536
"""Requests of plain token IDs up to this many (what 256 KiB of JSON holds) are prepared on
the event loop, for the same reason as :data:`INLINE_BODY_BYTES`; text, chat messages, policy
tokens and step separators run a tokenizer and always go to a worker thread."""


def inline(request: RewardRequest) -> bool:
    """Whether preparing ``request`` is cheap enough for the event loop: token IDs only, no
    tokenizer to run, at most :data:`INLINE_TOKENS` of them."""
    if request.policy_tokenizer is not None or request.step_separator is not None:
        return False
    tokens = 0
    for item in request.items:
        if item.prompt_ids is None or item.response_ids is None:
            return False
        tokens += len(item.prompt_ids) + len(item.response_ids)
    return tokens <= INLINE_TOKENS


class Scheduler(Protocol):
    """What the service needs of a batcher: the in-process
    :class:`~tokenreward_service.batching.Batcher`, or the engine process's stand-in for it
    (:class:`~tokenreward_service.engine.EngineProcess`)."""

    async def submit(self, jobs: Sequence[Job], *, timeout_s: float) -> list[torch.Tensor]: ...


class ResultObserver:
    """What the service reports about its outputs (metrics implement it; tests may too)."""

    def observe_results(
        self, scores: torch.Tensor, prompt_scores: torch.Tensor, rewards: torch.Tensor
    ) -> None:
        """Scores ``[B]``, prompt scores ``[B]`` (NaN: empty prompt), token rewards (flat)."""

    def observe_nonfinite(self, items: int) -> None:
        """``items`` items came out NaN or infinite."""


class RewardService:
    """Adapts the wire protocol to the batcher and the redistribution math."""

    def __init__(
        self,
        spec: ModelSpec,
        batcher: Scheduler,
        *,
        timeout_s: float,
        preparer: Preparer | None = None,
        observer: ResultObserver | None = None,
    ) -> None:
        self.spec = spec
        self.preparer = preparer or Preparer(vocab_size=spec.vocab_size, suffix_ids=spec.suffix_ids)
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
            chat_template=self.preparer.chat_template is not None,
            policy_tokenizers=sorted(self.preparer.policies),
            encodings=["application/json", binary.MEDIA_TYPE],
            format=s.format,
            head=s.head,
            objective=s.objective,
            normalization=s.normalization,
        )

    def check(self, request: RewardRequest, items: Sequence[Prepared]) -> None:
        """Check every prepared item against the model; the first bad item is named."""
        for index, item in enumerate(items):
            if request.baseline == "prompt" and not item.prompt_len:
                raise InvalidRequest(
                    "the prompt is empty, but baseline 'prompt' reads the score at the last "
                    "prompt token; send a prompt or use baseline 'zero'",
                    item=index,
                )
            if not item.sequence:
                raise InvalidRequest("the item gives the RM no tokens to read", item=index)
            if len(item.sequence) > self.spec.max_length:
                raise InvalidRequest(
                    f"sequence of {len(item.sequence)} RM tokens (prompt {item.prompt_len}, "
                    f"response and suffix {len(item.sequence) - item.prompt_len}) exceeds the "
                    f"maximum length {self.spec.max_length}; it is not truncated",
                    item=index,
                )

    async def rewards(self, request: RewardRequest) -> RewardResponse:
        # A large request or a tokenizer's work goes off the event loop, where it does not
        # hold up the others; a small one is cheaper here (see INLINE_TOKENS).
        if inline(request):
            items = self.preparer.prepare(request)
        else:
            items = await asyncio.to_thread(self.preparer.prepare, request)
        self.check(request, items)
        jobs = [Job(item.sequence, item.prompt_len) for item in items]
        try:
            scores = await asyncio.wait_for(
                self._batcher.submit(jobs, timeout_s=self._timeout_s), self._timeout_s
            )
        except asyncio.TimeoutError:
            raise DeadlineExceeded(
                f"the request did not finish within its {self._timeout_s:g} s deadline"
            ) from None
        return self._results(request, items, scores)

    def _results(
        self, request: RewardRequest, items: Sequence[Prepared], scores: list[torch.Tensor]
    ) -> RewardResponse:
        width = max(len(item.sequence) for item in items)
        padded = torch.zeros((len(scores), width), dtype=torch.float32)
        for row, row_scores in enumerate(scores):
            padded[row, : row_scores.shape[0]] = row_scores
        reads = None
        if any(item.read_positions is not None for item in items):
            longest = max(item.response_len for item in items)
            reads = torch.full((len(items), longest), -1, dtype=torch.long)
            for row, item in enumerate(items):
                n = item.response_len
                if item.read_positions is None:
                    reads[row, :n] = torch.arange(item.prompt_len, item.prompt_len + n)
                else:
                    reads[row, :n] = torch.tensor(item.read_positions, dtype=torch.long)
        out = redistribute(
            padded,
            torch.tensor([it.prompt_len for it in items]),
            torch.tensor([it.response_len for it in items]),
            torch.tensor([len(it.sequence) for it in items]),
            beta_c=request.beta_c,
            baseline=request.baseline,
            read_positions=reads,
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
            n = item.response_len
            p = prompt_score[row]
            token_rewards = rewards[row][:n]
            # Built from values made here, not read from outside: no validation to pay.
            results.append(
                RewardResult.model_construct(
                    id=wire.id,
                    token_rewards=token_rewards,
                    score=score[row],
                    prompt_score=None if p != p else p,  # NaN: empty prompt
                    prefix_scores=None if prefixes is None else prefixes[row][:n],
                    response_tokens=item.response_tokens,
                    response_offsets=item.response_offsets,
                    step_rewards=None
                    if item.step_ends is None
                    else step_sums(token_rewards, item.step_ends),
                    step_ends=item.step_ends,
                )
            )
        return RewardResponse.model_construct(model=self._ref, results=results)
