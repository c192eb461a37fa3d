"""Benchmark workloads: seeded random token IDs in the shapes RL training sends.

Each workload is a list of requests (each a list of items) plus how many clients send them
concurrently. Token IDs are drawn uniformly from the vocabulary: a reward model's cost does not
depend on which tokens it reads. The opt-in ``mixed-policy`` workload is real text instead,
since it measures tokenizers (:mod:`tokenreward_service.bench.policy`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["OPT_IN_WORKLOADS", "WORKLOADS", "Item", "Workload", "make_workload"]

Item = tuple[list[int], list[int]]


@dataclass(frozen=True)
class Workload:
    name: str
    requests: list[list[Item]]
    concurrency: int
    policy_tokenizer: str | None = None
    """Sent as the requests' ``policy_tokenizer``: the items are that tokenizer's IDs."""
    rm_tokens: int | None = None
    """For policy items: the RM tokens the server makes of them, the work it really does."""

    @property
    def items(self) -> list[Item]:
        return [item for request in self.requests for item in request]

    @property
    def tokens(self) -> int:
        """Tokens the RM reads (prompt and response, no suffix): throughput is counted in
        these, so a policy workload and its RM twin compare equal work."""
        if self.rm_tokens is not None:
            return self.rm_tokens
        return sum(len(p) + len(r) for p, r in self.items)


WORKLOADS = ("mixed", "group", "long")
"""What ``--workload all`` runs."""
OPT_IN_WORKLOADS = ("mixed-policy",)
"""Run only when named: they need packages beyond the server's (the policy tokenizer and the
text corpus) and add minutes to a run that ``all`` already keeps at about 13."""


def make_workload(name: str, *, vocab_size: int, scale: float = 1.0, seed: int = 0) -> Workload:
    """The named workload; ``scale`` < 1 shrinks the item count (for smoke tests), never the
    shapes of the items."""
    rng = random.Random(f"{name}-{seed}")

    def ids(n: int) -> list[int]:
        return [rng.randrange(vocab_size) for _ in range(n)]

    def count(n: int) -> int:
        return max(1, round(n * scale))

    if name == "mixed":
        # 512 items, prompt 32-256, response 16-384; 16 clients sending 8 items per request.
        items = [(ids(rng.randint(32, 256)), ids(rng.randint(16, 384))) for _ in range(count(512))]
        return Workload(name, [items[i : i + 8] for i in range(0, len(items), 8)], concurrency=16)
    if name == "group":
        # 64 prompts x 8 responses (GRPO-style): prompt 256-512, response 32-128. Each group is
        # one request, as a rollout worker sends its n samples.
        requests = []
        for _ in range(count(64)):
            prompt = ids(rng.randint(256, 512))
            requests.append([(prompt, ids(rng.randint(32, 128))) for _ in range(8)])
        return Workload(name, requests, concurrency=16)
    if name == "long":
        # 64 items of 2,000-4,000 tokens in all, a quarter of it prompt.
        items = []
        for _ in range(count(64)):
            total = rng.randint(2000, 4000)
            items.append((ids(total // 4), ids(total - total // 4)))
        return Workload(name, [items[i : i + 4] for i in range(0, len(items), 4)], concurrency=16)
    raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
