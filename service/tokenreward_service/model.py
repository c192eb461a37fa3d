"""Read a Hugging Face reward model's score head at every position in one pass.

A sequence-classification RM (``num_labels=1``) is a decoder with a linear ``score`` head that
HF reads at the last token. Running the decoder once and applying that same head (in float32)
to every position's hidden state gives the score of every prefix at the cost of one forward
pass; causality makes position ``i`` see exactly ``tokens[0..i]``, so the result equals running
each prefix separately. The head may also come from elsewhere (OpenRLHF's or TRL's value head,
a column of a multi-objective head: :mod:`tokenreward_service.heads`), or an adapter may compute
the scores itself (:mod:`tokenreward_service.adapters`). Loading and checking a model is
:mod:`tokenreward_service.loading`; this module knows nothing of HTTP or batching.

Memory stays linear in the tokens of a batch, so the batcher's token budget bounds it:

- Rows are right-padded, and in a causal model no real position attends to the padding after
  it, so the padding mask is not given to the decoder: without one, attention runs in its
  fused causal kernels instead of materialising a ``[batch, 1, L, L]`` mask (the scores of
  padded positions, which nobody reads, are all that changes).
- A sliding-window model (Mistral, Qwen2 with ``use_sliding_window``) needs an explicit mask,
  which transformers builds ``L x L``. Sequences longer than the window plus
  :data:`SLIDING_CHUNK` run in chunks of that many tokens with the key/value cache, which for
  sliding layers keeps only the window: the mask of a chunk is ``chunk x (window + chunk)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tokenreward_service.adapters import ScoreFunction
from tokenreward_service.heads import LinearHead

SLIDING_CHUNK = 1024
"""Tokens per forward call of a long sequence through a sliding-window model."""

__all__ = [
    "MIN_SHARED_PROMPT",
    "SLIDING_CHUNK",
    "BatchScores",
    "ModelSpec",
    "RewardModel",
    "find_shared_prompts",
    "host_threads",
    "right_pad",
    "sliding_window",
]


@dataclass(frozen=True)
class BatchScores:
    """Per-position scores of a batch, with what computing them cost."""

    scores: list[torch.Tensor]
    computed_tokens: int
    """Positions run through the model, padding included."""
    real_tokens: int
    """Tokens run through the model, padding excluded (a shared prompt counts once)."""
    shared_items: int
    """Items whose prompt was computed once for its whole group."""
    oom_splits: int = 0
    """Times the batch ran out of device memory and was split in two to be retried."""


@dataclass(frozen=True)
class ModelSpec:
    """What is loaded and how it runs; the server reports it at ``GET /v1/model``."""

    id: str
    revision: str
    architecture: str
    vocab_size: int
    max_length: int
    dtype: str
    device: str
    suffix_ids: tuple[int, ...]
    random_weights: bool = False
    format: str = "sequence-classification"
    """How the folder was read (:mod:`tokenreward_service.formats`)."""
    head: str = "score"
    """The head read at every position, or ``adapter <entry point>``."""
    objective: str | None = None
    """The column or weighted sum of a multi-objective head that is redistributed."""
    normalization: str | None = None
    """``(score - mean) / std`` when the reward is normalised (OpenRLHF)."""


class RewardModel:
    """A loaded RM: ``score`` returns every position's score for a batch of sequences.

    ``model`` is the loaded HF model; its ``base_model`` is the decoder. The scores are
    ``head`` (default: a linear head from ``model.score``) read at every position of the
    decoder's last hidden states, or, with ``adapter``, whatever that function returns for
    ``model`` (and then no prompt is shared: that needs the decoder's cache).
    """

    def __init__(
        self,
        model: Any,
        spec: ModelSpec,
        tokenizer: Any | None = None,
        *,
        share_prompts: bool = True,
        head: LinearHead | None = None,
        adapter: ScoreFunction | None = None,
        sliding_chunk: int = SLIDING_CHUNK,
    ) -> None:
        self._model = model
        self.spec = spec
        self.tokenizer = tokenizer
        self._adapter = adapter
        self.share_prompts = share_prompts and adapter is None
        self._device = torch.device(spec.device)
        self._backbone = model.base_model
        self._head = head
        if adapter is None and head is None:
            self._head = LinearHead.from_module(model.score)
        parameters = inspect.signature(self._backbone.forward).parameters
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        self._window = sliding_window(getattr(self._backbone, "config", None))
        self.sliding_chunk = sliding_chunk
        """Tokens per forward call when a sequence is long enough to run through a sliding
        window in chunks (see the module's docstring)."""

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states ``[B, L, H]`` of the decoder, in the model's dtype.

        ``attention_mask`` must be right padding (ones, then zeros): it is not passed on,
        since no real position of a causal model sees the padding after it (see the module's
        docstring); positions past a row's end are junk.
        """
        del attention_mask
        length = input_ids.shape[1]
        if self._window is not None and length > self._window + self.sliding_chunk:
            return self._chunked_hidden_states(input_ids)
        out = self._backbone(input_ids=input_ids, use_cache=False)
        hidden: torch.Tensor = out.last_hidden_state
        return hidden

    def _chunked_hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The decoder run :attr:`sliding_chunk` tokens at a time, each chunk against the cache
        of those before it: the same hidden states, with masks no larger than a chunk by
        (window + chunk) for sliding layers."""
        cache = None
        parts = []
        for start in range(0, input_ids.shape[1], self.sliding_chunk):
            extra: dict[str, Any] = {} if cache is None else {self._cache_kwarg: cache}
            out = self._backbone(
                input_ids=input_ids[:, start : start + self.sliding_chunk], use_cache=True, **extra
            )
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            parts.append(out.last_hidden_state)
        return torch.cat(parts, dim=1)

    def score_padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, L]`` in float32 of right-padded ``input_ids``; padded positions are junk."""
        with torch.inference_mode():
            if self._adapter is not None:
                scores = self._adapter(self._model, input_ids, attention_mask)
                if not isinstance(scores, torch.Tensor) or scores.shape != input_ids.shape:
                    shape = getattr(scores, "shape", type(scores).__name__)
                    raise ValueError(
                        f"adapter {self.spec.head!r} returned {shape}, not scores shaped like "
                        f"input_ids {tuple(input_ids.shape)}"
                    )
                return scores.to(torch.float32)
            assert self._head is not None
            return self._head(self.hidden_states(input_ids, attention_mask))

    def score(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Per-position float32 scores (on CPU) of each sequence, in one forward pass.

        Sequences are right-padded to the longest; causal attention never reaches the padding
        after a row, so a sequence's scores do not depend on the others in the batch (up to
        float rounding).
        """
        scores, _ = self._score_padded_batch(sequences)
        return scores

    def score_batch(
        self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]
    ) -> BatchScores:
        """:meth:`score_shared`, splitting the batch in two and retrying each half when the
        device runs out of memory (a batch of one that does not fit is a real error)."""
        try:
            return self.score_shared(sequences, prompt_lens)
        except torch.cuda.OutOfMemoryError:
            if len(sequences) == 1:
                raise
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
        mid = len(sequences) // 2
        first = self.score_batch(sequences[:mid], prompt_lens[:mid])
        second = self.score_batch(sequences[mid:], prompt_lens[mid:])
        return BatchScores(
            scores=first.scores + second.scores,
            computed_tokens=first.computed_tokens + second.computed_tokens,
            real_tokens=first.real_tokens + second.real_tokens,
            shared_items=first.shared_items + second.shared_items,
            oom_splits=1 + first.oom_splits + second.oom_splits,
        )

    def launch_batch(
        self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]
    ) -> Callable[[], BatchScores]:
        """Start :meth:`score_batch`'s forward pass and return a function that waits for its
        scores: the batcher launches the next batch while this one computes
        (:mod:`tokenreward_service.inference`).

        On CUDA the kernels and the copy of the scores into pinned host memory are queued on
        the device's stream, and an event marks their end; the returned function waits on it.
        Batches with shared prompts (two passes, the second reading the first's cache) and
        batches that run out of memory (split and retried) are scored at once, as
        :meth:`score_batch` scores them, and so is every batch on the CPU, where there is no
        device to run ahead of the host.
        """
        cuda = self._device.type == "cuda"
        if not cuda or (
            self._can_share(sequences) and find_shared_prompts(sequences, prompt_lens)[0]
        ):
            scored = self.score_batch(sequences, prompt_lens)
            return lambda: scored
        try:
            scores, computed = self._padded_on_device(sequences)
            host = torch.empty(scores.shape, dtype=scores.dtype, pin_memory=True)
            host.copy_(scores, non_blocking=True)
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record()
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            split = self.score_batch(sequences, prompt_lens)
            return lambda: split

        def wait() -> BatchScores:
            done.synchronize()
            return BatchScores(
                scores=_rows(host, sequences),
                computed_tokens=computed,
                real_tokens=sum(len(seq) for seq in sequences),
                shared_items=0,
            )

        return wait

    def score_shared(
        self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]
    ) -> BatchScores:
        """Like :meth:`score`, but items that share a prompt have it computed once.

        Items whose first ``prompt_lens[i]`` tokens are identical (at least two of them, and a
        prompt of at least :data:`MIN_SHARED_PROMPT` tokens) form a group: the prompts run once,
        with their key/value cache, and each response then runs against its prompt's cache.
        Everything else runs as one right-padded batch. The scores are the same either way (up
        to float rounding), since a causal model computes a prompt's positions identically
        whatever follows it.
        """
        groups, singles = (
            find_shared_prompts(sequences, prompt_lens) if self._can_share(sequences) else ([], [])
        )
        if not groups:
            scores, computed = self._score_padded_batch(sequences)
            real = sum(len(seq) for seq in sequences)
            return BatchScores(
                scores=scores, computed_tokens=computed, real_tokens=real, shared_items=0
            )
        out: list[torch.Tensor | None] = [None] * len(sequences)
        computed = 0
        if singles:
            single_scores, computed = self._score_padded_batch([sequences[i] for i in singles])
            for index, row in zip(singles, single_scores, strict=True):
                out[index] = row
        grouped, grouped_computed = self._score_shared(sequences, prompt_lens, groups)
        for index, row in grouped.items():
            out[index] = row
        done = [s for s in out if s is not None]
        assert len(done) == len(sequences)
        real = sum(len(sequences[i]) for i in singles)
        real += sum(prompt_lens[g[0]] for g in groups)  # each shared prompt once
        real += sum(len(sequences[i]) - prompt_lens[i] for g in groups for i in g)
        return BatchScores(
            scores=done,
            computed_tokens=computed + grouped_computed,
            real_tokens=real,
            shared_items=sum(len(g) for g in groups),
        )

    def _score_padded_batch(
        self, sequences: Sequence[Sequence[int]]
    ) -> tuple[list[torch.Tensor], int]:
        scores, computed = self._padded_on_device(sequences)
        return _rows(scores.cpu(), sequences), computed

    def _padded_on_device(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, int]:
        """``[B, longest]`` scores of the right-padded batch, left on the device (on CUDA the
        kernels may still be running), and the positions computed."""
        input_ids, attention_mask = right_pad(sequences)
        scores = self.score_padded(
            input_ids.to(self._device, non_blocking=True),
            attention_mask.to(self._device, non_blocking=True),
        )
        return scores, int(input_ids.numel())

    def _can_share(self, sequences: Sequence[Sequence[int]]) -> bool:
        """Sharing needs the decoder's cache (not with an adapter), and runs a prompt in one
        pass (not for sequences long enough to need chunks through a sliding window)."""
        if not self.share_prompts or self._head is None:
            return False
        longest = max((len(seq) for seq in sequences), default=0)
        return self._window is None or longest <= self._window + self.sliding_chunk

    def _score_shared(
        self,
        sequences: Sequence[Sequence[int]],
        prompt_lens: Sequence[int],
        groups: list[list[int]],
    ) -> tuple[dict[int, torch.Tensor], int]:
        """Two passes: every group's prompt once (keeping the key/value cache), then every
        grouped item's response against its own prompt's cache rows."""
        prompts = [sequences[group[0]][: prompt_lens[group[0]]] for group in groups]
        prompt_ids, prompt_mask = right_pad(prompts)
        members = [index for group in groups for index in group]
        owner = torch.tensor([g for g, group in enumerate(groups) for _ in group], dtype=torch.long)
        responses = [sequences[index][prompt_lens[index] :] for index in members]
        response_ids, response_mask = right_pad(responses)
        plen = torch.tensor([prompt_lens[index] for index in members], dtype=torch.long)
        positions = plen.unsqueeze(1) + torch.arange(response_ids.shape[1]).unsqueeze(0)
        device = self._device
        head = self._head
        assert head is not None
        with torch.inference_mode():
            first = self._backbone(
                input_ids=prompt_ids.to(device),
                attention_mask=prompt_mask.to(device),
                use_cache=True,
            )
            prompt_scores = head(first.last_hidden_state).cpu()
            cache = (
                first.cache if getattr(first, "cache", None) is not None else first.past_key_values
            )
            cache.reorder_cache(owner.to(device))  # one row of prompt keys/values per item
            second = self._backbone(
                input_ids=response_ids.to(device),
                attention_mask=torch.cat([prompt_mask[owner], response_mask], dim=1).to(device),
                position_ids=positions.to(device),
                use_cache=True,
                **{self._cache_kwarg: cache},
            )
            response_scores = head(second.last_hidden_state).cpu()
        out = {}
        for row, index in enumerate(members):
            g = int(owner[row])
            p = prompt_lens[index]
            r = len(sequences[index]) - p
            out[index] = torch.cat([prompt_scores[g, :p], response_scores[row, :r]])
        return out, int(prompt_ids.numel() + response_ids.numel())


def _rows(scores: torch.Tensor, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Each sequence's own positions of a right-padded ``[B, longest]`` batch."""
    return [scores[row, : len(seq)] for row, seq in enumerate(sequences)]


MIN_SHARED_PROMPT = 8
"""Shorter prompts are not worth a second forward call: they are recomputed per item."""


def find_shared_prompts(
    sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]
) -> tuple[list[list[int]], list[int]]:
    """Indices grouped by identical prompt (groups of two or more), and the indices left alone."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    singles: list[int] = []
    for index, (seq, p) in enumerate(zip(sequences, prompt_lens, strict=True)):
        if p < MIN_SHARED_PROMPT or p >= len(seq):
            singles.append(index)
        else:
            by_prompt.setdefault(tuple(seq[:p]), []).append(index)
    groups = []
    for members in by_prompt.values():
        if len(members) >= 2:
            groups.append(members)
        else:
            singles.extend(members)
    return groups, sorted(singles)


def sliding_window(config: Any) -> int | None:
    """The attention window of a model config, if any of its layers attends through one.

    Mistral sets ``sliding_window`` for every layer; Qwen2 only with ``use_sliding_window``
    (it then sets it, and ``layer_types`` names the layers); Gemma-style configs alternate.
    """
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window <= 0:
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list | tuple) and "sliding_attention" not in layer_types:
        return None
    return window


def right_pad(sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, longest]`` token IDs, zeros after each row's end, and the mask of real positions.

    One pass over all the IDs into one array and one masked assignment, instead of a tensor
    per row: a third of the host time for a batch of 32 ``mixed`` items (0.44 against 1.3 ms),
    time the inference thread otherwise holds the GIL against the event loop."""
    count = len(sequences)
    lengths = np.fromiter((len(seq) for seq in sequences), dtype=np.int64, count=count)
    flat = np.fromiter(
        (token for seq in sequences for token in seq), dtype=np.int64, count=int(lengths.sum())
    )
    mask = np.arange(int(lengths.max())) < lengths[:, None]
    input_ids = np.zeros(mask.shape, dtype=np.int64)
    input_ids[mask] = flat  # row-major: each row's IDs in order, then the next row's
    return torch.from_numpy(input_ids), torch.from_numpy(mask.astype(np.int64))


def host_threads(spec: ModelSpec) -> None:
    """With the model on an accelerator, the host's torch work (laying batches out,
    redistributing, reading results) runs on one thread.

    Those tensors are small, and an OpenMP team spun up for one of them keeps its workers
    spinning between parallel regions: on the simulated 1M tokens/s device one such worker
    used 30% of a core, taken from the event loop and the clients. On the CPU the forward pass
    itself needs the intra-op threads, so they stay.
    """
    if torch.device(spec.device).type != "cpu":
        torch.set_num_threads(1)
