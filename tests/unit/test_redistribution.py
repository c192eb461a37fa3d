"""Properties of the pure redistribution math (Hypothesis) and a worked example."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenreward_service.redistribution import redistribute

finite = st.floats(min_value=-50, max_value=50, allow_nan=False, allow_infinity=False)


@st.composite
def items(draw: st.DrawFn, *, min_prompt: int = 1) -> tuple[list[float], int, int, int]:
    """Per-position scores of one item and its prompt / response / suffix lengths."""
    p = draw(st.integers(min_prompt, 6))
    t = draw(st.integers(1, 8))
    s = draw(st.integers(0, 2))
    scores = draw(st.lists(finite, min_size=p + t + s, max_size=p + t + s))
    return scores, p, t, s


def run_one(
    scores: list[float], p: int, t: int, s: int, **kw: object
) -> tuple[list[float], float, float]:
    out = redistribute(
        torch.tensor([scores], dtype=torch.float32),
        torch.tensor([p]),
        torch.tensor([t]),
        torch.tensor([p + t + s]),
        **kw,  # type: ignore[arg-type]
    )
    return out.token_rewards[0, :t].tolist(), float(out.score[0]), float(out.prompt_score[0])


def f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def test_worked_example() -> None:
    # prompt [a, b], response [c, d, e], suffix [EOS]; s = scores after each token.
    scores = [0.5, 1.0, 1.5, 0.25, 2.0, 3.0]
    rewards, score, prompt_score = run_one(scores, 2, 3, 1)
    assert prompt_score == 1.0
    assert score == 3.0  # read after the suffix
    assert rewards == [0.5, -1.25, 2.75]  # the last one folds the EOS increment: 3.0 - 0.25
    zero, _, _ = run_one(scores, 2, 3, 1, baseline="zero")
    assert zero == [1.5, -1.25, 2.75]
    half, _, _ = run_one(scores, 2, 3, 1, beta_c=0.5)
    assert half == [0.25, -0.625, 0.5 * 2.75 + 0.5 * 3.0]


@given(items(), st.sampled_from(["prompt", "zero"]))
def test_telescoping_sum(item: tuple[list[float], int, int, int], baseline: str) -> None:
    scores, p, t, s = item
    rewards, score, prompt_score = run_one(scores, p, t, s, baseline=baseline)
    s0 = prompt_score if baseline == "prompt" else 0.0
    assert score == f32(scores[-1])
    assert math.isclose(sum(rewards), score - s0, rel_tol=1e-12, abs_tol=1e-9)


@given(items(), st.sampled_from(["prompt", "zero"]))
def test_beta_zero_is_the_sparse_reward(
    item: tuple[list[float], int, int, int], baseline: str
) -> None:
    scores, p, t, s = item
    rewards, score, _ = run_one(scores, p, t, s, beta_c=0.0, baseline=baseline)
    assert rewards == [0.0] * (t - 1) + [score]


@given(items(), st.floats(0, 1), st.sampled_from(["prompt", "zero"]))
def test_linear_in_beta(
    item: tuple[list[float], int, int, int], beta: float, baseline: str
) -> None:
    scores, p, t, s = item
    dense, _, _ = run_one(scores, p, t, s, beta_c=1.0, baseline=baseline)
    sparse, _, _ = run_one(scores, p, t, s, beta_c=0.0, baseline=baseline)
    mixed, _, _ = run_one(scores, p, t, s, beta_c=beta, baseline=baseline)
    for m, d, sp in zip(mixed, dense, sparse, strict=True):
        assert math.isclose(m, beta * d + (1 - beta) * sp, rel_tol=1e-9, abs_tol=1e-9)


@given(items(), st.lists(finite, min_size=1, max_size=5), st.sampled_from(["prompt", "zero"]))
def test_causal_extension(
    item: tuple[list[float], int, int, int], extra: list[float], baseline: str
) -> None:
    """Extending the response leaves the rewards of the tokens before the old end unchanged:
    token t's reward depends only on prefix scores up to t (the last token alone also carries
    the suffix, which moves with the end)."""
    scores, p, t, s = item
    short_scores = scores[: p + t]
    # The extended sequence shares the first p + t prefix scores (causal model).
    long_scores = short_scores + extra + scores[p + t :]
    short, _, _ = run_one(short_scores, p, t, 0, baseline=baseline)
    long, _, _ = run_one(long_scores, p, t + len(extra), s, baseline=baseline)
    assert long[:t] == short
    with_suffix, _, _ = run_one(scores, p, t, s, baseline=baseline)
    assert with_suffix[: t - 1] == short[: t - 1]


@settings(max_examples=50)
@given(
    st.lists(items(), min_size=1, max_size=6), st.floats(0, 1), st.sampled_from(["prompt", "zero"])
)
def test_batch_and_padding_change_nothing(
    batch: list[tuple[list[float], int, int, int]], beta: float, baseline: str
) -> None:
    width = max(len(scores) for scores, *_ in batch) + 3
    padded = torch.full((len(batch), width), float("nan"))  # junk in padding must never leak
    for row, (scores, *_) in enumerate(batch):
        padded[row, : len(scores)] = torch.tensor(scores)
    out = redistribute(
        padded,
        torch.tensor([p for _, p, _, _ in batch]),
        torch.tensor([t for _, _, t, _ in batch]),
        torch.tensor([p + t + s for _, p, t, s in batch]),
        beta_c=beta,
        baseline=baseline,  # type: ignore[arg-type]
    )
    for row, (scores, p, t, s) in enumerate(batch):
        alone, score, _ = run_one(scores, p, t, s, beta_c=beta, baseline=baseline)
        assert out.token_rewards[row, :t].tolist() == alone
        assert float(out.score[row]) == score
        assert not out.response_mask[row, t:].any()
        assert (out.token_rewards[row, t:] == 0).all()


@given(items(min_prompt=0))
def test_zero_baseline_allows_an_empty_prompt(item: tuple[list[float], int, int, int]) -> None:
    scores, p, t, s = item
    rewards, score, prompt_score = run_one(scores, p, t, s, baseline="zero")
    assert math.isclose(sum(rewards), score, rel_tol=1e-12, abs_tol=1e-9)
    assert math.isnan(prompt_score) == (p == 0)


def test_refuses_what_it_cannot_compute() -> None:
    scores = torch.zeros((1, 4))
    with pytest.raises(ValueError, match="non-empty prompt"):
        redistribute(scores, torch.tensor([0]), torch.tensor([2]), torch.tensor([2]))
    with pytest.raises(ValueError, match="at least one token"):
        redistribute(scores, torch.tensor([1]), torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(ValueError, match="beta_c"):
        redistribute(scores, torch.tensor([1]), torch.tensor([1]), torch.tensor([2]), beta_c=1.5)
    with pytest.raises(ValueError, match="exceed"):
        redistribute(scores, torch.tensor([1]), torch.tensor([1]), torch.tensor([5]))
