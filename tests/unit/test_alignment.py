"""RM increments onto other tokens: the crediting rule and its properties, on random byte
partitions of random text (emoji, CJK, combining marks, newlines), cut anywhere, also inside a
character, as byte-level tokenizers do."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenreward_service.alignment import (
    char_spans,
    read_positions,
    separator_cuts,
    step_ends,
    step_sums,
)
from tokenreward_service.redistribution import redistribute

ALPHABET = "ab c\n😀é\u0301你好"


@st.composite
def case(draw: st.DrawFn) -> tuple[bytes, list[int], list[int], int]:
    text = draw(st.text(alphabet=ALPHABET, min_size=1, max_size=24)).encode()
    size = len(text)

    def partition() -> list[int]:
        cuts = draw(st.sets(st.integers(1, size - 1), max_size=size)) if size > 1 else set()
        return [*sorted(cuts), size]

    rm_ends = partition()
    policy_ends = partition()
    # A policy may end with special tokens (EOS) that have no bytes.
    policy_ends += [size] * draw(st.integers(0, 2))
    prompt_len = draw(st.integers(1, 4))
    return text, rm_ends, policy_ends, prompt_len


def _policy_rewards(
    scores: list[float],
    prompt_len: int,
    rm_count: int,
    positions: list[int],
    *,
    baseline: str = "prompt",
    beta_c: float = 1.0,
) -> tuple[list[float], list[float]]:
    out = redistribute(
        torch.tensor([scores], dtype=torch.float64),
        torch.tensor([prompt_len]),
        torch.tensor([len(positions)]),
        torch.tensor([len(scores)]),
        beta_c=beta_c,
        baseline=baseline,  # type: ignore[arg-type]
        read_positions=torch.tensor([positions]),
    )
    return out.token_rewards[0].tolist(), out.prefix_scores[0].tolist()


@settings(max_examples=200, deadline=None)
@given(case(), st.integers(0, 2), st.sampled_from(["prompt", "zero"]), st.randoms())
def test_rewards_telescope_and_nothing_is_credited_early(
    data: tuple[bytes, list[int], list[int], int],
    suffix: int,
    baseline: str,
    rng: random.Random,
) -> None:
    _, rm_ends, policy_ends, prompt_len = data
    seq_len = prompt_len + len(rm_ends) + suffix
    scores = [rng.uniform(-3, 3) for _ in range(seq_len)]
    positions = read_positions(rm_ends, policy_ends, prompt_len)
    rewards, prefix = _policy_rewards(
        scores, prompt_len, len(rm_ends), positions, baseline=baseline
    )
    assert len(rewards) == len(policy_ends)
    s0 = scores[prompt_len - 1] if baseline == "prompt" else 0.0
    # The RM-token rewards, computed on the RM's own tokens, have the same total.
    rm_rewards, _ = _policy_rewards(
        scores,
        prompt_len,
        len(rm_ends),
        read_positions(rm_ends, rm_ends, prompt_len),
        baseline=baseline,
    )
    assert sum(rewards) == pytest.approx(sum(rm_rewards), abs=1e-9)
    assert sum(rewards) == pytest.approx(scores[-1] - s0, abs=1e-9)
    # Written out: the prefix after policy token i is the RM score after the last RM token
    # that ends within its bytes, the baseline before any, the final score for the last one.
    for i, end in enumerate(policy_ends[:-1]):
        read = [j for j, e in enumerate(rm_ends) if e <= end]
        expected = scores[prompt_len + read[-1]] if read else s0
        assert prefix[i] == pytest.approx(expected, abs=1e-12)
    # Behaviour, not only the formula: changing what the RM read after a policy token ends
    # changes nothing credited up to that token.
    for i, end in enumerate(policy_ends[:-1]):
        later = [prompt_len + j for j, e in enumerate(rm_ends) if e > end]
        changed = list(scores)
        for position in later:
            changed[position] += rng.uniform(1, 5)
        moved, _ = _policy_rewards(changed, prompt_len, len(rm_ends), positions, baseline=baseline)
        assert moved[: i + 1] == pytest.approx(rewards[: i + 1], abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(case(), st.floats(0.0, 1.0), st.randoms())
def test_identical_tokens_equal_the_id_path(
    data: tuple[bytes, list[int], list[int], int], beta_c: float, rng: random.Random
) -> None:
    _, rm_ends, _, prompt_len = data
    scores = [rng.uniform(-3, 3) for _ in range(prompt_len + len(rm_ends) + 1)]
    positions = read_positions(rm_ends, rm_ends, prompt_len)
    assert positions == [prompt_len + t for t in range(len(rm_ends))]
    aligned, _ = _policy_rewards(scores, prompt_len, len(rm_ends), positions, beta_c=beta_c)
    plain = redistribute(
        torch.tensor([scores], dtype=torch.float64),
        torch.tensor([prompt_len]),
        torch.tensor([len(rm_ends)]),
        torch.tensor([len(scores)]),
        beta_c=beta_c,
    )
    assert aligned == pytest.approx(plain.token_rewards[0].tolist(), abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(case(), st.floats(0.0, 1.0), st.randoms())
def test_the_sparse_part_lands_on_the_last_policy_token(
    data: tuple[bytes, list[int], list[int], int], beta_c: float, rng: random.Random
) -> None:
    _, rm_ends, policy_ends, prompt_len = data
    scores = [rng.uniform(-3, 3) for _ in range(prompt_len + len(rm_ends))]
    positions = read_positions(rm_ends, policy_ends, prompt_len)
    dense, _ = _policy_rewards(scores, prompt_len, len(rm_ends), positions)
    mixed, _ = _policy_rewards(scores, prompt_len, len(rm_ends), positions, beta_c=beta_c)
    expected = [beta_c * r for r in dense]
    expected[-1] += (1 - beta_c) * scores[-1]
    assert mixed == pytest.approx(expected, abs=1e-9)


def test_a_policy_token_ending_inside_an_rm_token_waits_for_it() -> None:
    # RM token "hello" (bytes 0..5) spans policy tokens "hel" and "lo": "hel" gets nothing.
    assert read_positions([5, 11], [3, 5, 11], 2) == [-1, 2, 3]
    # Policy token "hello world" covers two RM tokens: it gets both increments.
    assert read_positions([5, 11], [11], 2) == [3]


@settings(max_examples=200, deadline=None)
@given(case(), st.sampled_from(["\n", "c", "😀", "\n\n"]), st.randoms())
def test_steps_partition_the_tokens_and_keep_the_total(
    data: tuple[bytes, list[int], list[int], int], separator: str, rng: random.Random
) -> None:
    text, _, policy_ends, _ = data
    spans = list(zip([0, *policy_ends[:-1]], policy_ends, strict=True))
    cuts = separator_cuts(text, separator.encode())
    ends = step_ends(spans, cuts)
    assert ends[-1] == len(spans) - 1
    assert ends == sorted(set(ends))
    rewards = [rng.uniform(-1, 1) for _ in spans]
    assert sum(step_sums(rewards, ends)) == pytest.approx(sum(rewards), abs=1e-12)
    # A step never ends before a token that ends inside it: every step but the last ends at a
    # token whose last byte lies before a cut, and the next token's last byte lies after it.
    for k, end in enumerate(ends[:-1]):
        start, stop = spans[end]
        following = [s for s in spans[end + 1 :] if s[1] > s[0]]
        if stop > start and following:
            boundary = [c for c in cuts if stop - 1 < c]
            assert boundary, (k, spans, cuts)
            assert following[0][1] - 1 >= boundary[0], (k, spans, cuts)


def test_steps_of_a_worked_example() -> None:
    text = "step one\n\nstep two\n\nend"
    tokens = ["step", " one", "\n\n", "step", " two", "\n", "\n", "end", ""]
    spans = []
    position = 0
    for token in tokens:
        spans.append((position, position + len(token.encode())))
        position += len(token.encode())
    ends = step_ends(spans, separator_cuts(text.encode(), b"\n\n"))
    assert ends == [2, 6, 8]  # the separator closes its step; EOS joins the last step


def test_char_spans_cover_whole_characters() -> None:
    text = "a😀b"
    # byte-level: "a", first half of the emoji, second half, "b"
    spans = [(0, 1), (1, 3), (3, 5), (5, 6), (6, 6)]
    assert char_spans(text, spans) == [(0, 1), (1, 2), (1, 2), (2, 3), (3, 3)]
