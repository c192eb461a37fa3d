"""The RL example (examples/rl): its pieces against plain references, and a smoke run of the
three processes (service, rollout worker, learner) talking over the network."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "rl"
sys.path.insert(0, str(EXAMPLE))

from common import gather_responses, response_logprobs  # noqa: E402
from learner import check_counts, gae  # noqa: E402


def _gae_by_loops(
    rewards: list[float], values: list[float], gamma: float, lam: float
) -> tuple[list[float], list[float]]:
    """Textbook GAE for one episode, V = 0 after the last step."""
    n = len(rewards)
    advantages = []
    for t in range(n):
        total = 0.0
        for k in range(t, n):
            following = values[k + 1] if k + 1 < n else 0.0
            delta = rewards[k] + gamma * following - values[k]
            total += (gamma * lam) ** (k - t) * delta
        advantages.append(total)
    return advantages, [a + v for a, v in zip(advantages, values, strict=True)]


def test_gae_matches_the_textbook_sum_on_padded_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3]
    rewards = torch.randn((3, 5), generator=gen)
    values = torch.randn((3, 5), generator=gen)
    mask = torch.zeros((3, 5))
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    for gamma, lam in ((1.0, 0.95), (0.9, 1.0), (0.99, 0.0)):
        advantages, returns = gae(rewards * mask, values, mask, gamma=gamma, lam=lam)
        for i, n in enumerate(lengths):
            want_adv, want_ret = _gae_by_loops(
                rewards[i, :n].tolist(), values[i, :n].tolist(), gamma, lam
            )
            assert advantages[i, :n].tolist() == pytest.approx(want_adv, abs=1e-5)
            assert returns[i, :n].tolist() == pytest.approx(want_ret, abs=1e-5)
            assert advantages[i, n:].abs().sum() == 0  # nothing leaks into padding
            assert returns[i, n:].abs().sum() == 0


def test_with_lambda_one_the_advantage_is_the_return_minus_the_value() -> None:
    rewards = torch.tensor([[0.5, -0.25, 1.0]])
    values = torch.tensor([[0.1, 0.2, 0.3]])
    advantages, _ = gae(rewards, values, torch.ones((1, 3)), gamma=1.0, lam=1.0)
    assert advantages[0].tolist() == pytest.approx([1.25 - 0.1, 0.75 - 0.2, 1.0 - 0.3])


def test_response_logprobs_equal_each_sequence_scored_alone() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9, 10, 11]]
    responses = [[12, 13, 2], [14, 15, 16, 17, 2], [18]]
    with torch.no_grad():
        batched = response_logprobs(model, prompts, responses)
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            ids = torch.tensor([p + r])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            alone = [float(logp[len(p) - 1 + j, tok]) for j, tok in enumerate(r)]
            assert batched[i, : len(r)].tolist() == pytest.approx(alone, abs=1e-5)
            assert batched[i, len(r) :].abs().sum() == 0


def test_gather_responses_reads_the_column_before_each_token() -> None:
    per_position = torch.arange(12, dtype=torch.float32).reshape(2, 6)
    got = gather_responses(per_position, [[1, 2], [1, 2, 3]], [[4, 5], [6]])
    # Row 0: prompt of 2, so the response's first token is predicted at column 1.
    assert got.tolist() == [[1.0, 2.0], [8.0, 0.0]]


def test_a_batch_with_shifted_credit_is_refused() -> None:
    good = {"responses": [[5, 6, 2], [7, 2]], "token_rewards": [[0.1, 0.2, 0.3], [0.0, 1.0]]}
    assert check_counts(good) == 5
    bad = {"responses": [[5, 6, 2], [7, 2]], "token_rewards": [[0.1, 0.2, 0.3], [1.0]]}
    with pytest.raises(RuntimeError, match="response 1: 2 tokens but 1 rewards"):
        check_counts(bad)


def _run(out: Path, *extra: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE / "run.py"), "--smoke", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary: dict[str, Any] = json.loads((out / "rl-summary.json").read_text())
    return summary


def test_smoke_run_three_processes_one_reward_per_policy_token(tmp_path: Path) -> None:
    summary = _run(tmp_path / "a")
    runs = {p.name: json.loads(p.read_text()) for p in (tmp_path / "a" / "runs").glob("*.json")}
    assert sorted(runs) == ["beta0-seed0.json", "beta1-seed0.json"]
    for name, run in runs.items():
        config = run["config"]
        assert len(run["curves"]) == config["updates"]
        for update in run["curves"]:
            assert (
                update["responses"] == config["prompts_per_update"] * config["samples_per_prompt"]
            )
            assert update["reward_tokens"] == update["response_tokens"] > 0, name
            assert all(s > 0 for s in update["seconds"].values())  # the service was called
        assert {"start", "end"} <= set(run["samples"])
    # The arms differ only in how the service spread the same score: the first rollout is the
    # same sample (same seed, same weights), scored the same, credited differently.
    first = {name: run["curves"][0] for name, run in runs.items()}
    assert first["beta0-seed0.json"]["score"] == first["beta1-seed0.json"]["score"]
    assert (tmp_path / "a" / "rl-curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(summary["arms"]) == {"sparse (β_c=0)", "dense (β_c=1)"}
    # Same seed, same policy, a fresh service and fresh processes: the same numbers.
    _run(tmp_path / "b", "--arms", "1", "--policy", str(tmp_path / "a" / "policy"))
    again = json.loads((tmp_path / "b" / "runs" / "beta1-seed0.json").read_text())
    assert again["curves"] == [
        {**c, "seconds": again["curves"][i]["seconds"]}
        for i, c in enumerate(runs["beta1-seed0.json"]["curves"])
    ]


def test_the_readme_table_is_the_committed_comparison() -> None:
    """Every figure of the README's PPO table comes from docs/rl/rl-summary.json, and the
    summary from the committed per-run curves."""
    from summary import summarise

    runs = [json.loads(p.read_text()) for p in sorted((ROOT / "docs/rl/runs").glob("*.json"))]
    assert len(runs) == 9
    summary = json.loads((ROOT / "docs/rl/rl-summary.json").read_text())
    fresh = summarise(runs, Path("/tmp"), target=summary["target_score"])
    assert fresh["arms"] == summary["arms"]
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Train a policy on the rewards") :]
    rows = {
        line.split("|")[1].strip(): line
        for line in section.splitlines()
        if line.startswith("| ") and "(β_c = " in line
    }
    import statistics

    for name, arm in summary["arms"].items():
        row = rows[name.replace("β_c=", "β_c = ").replace("mix (", "mixed (")]
        cells = [c.strip() for c in row.split("|")[1:-1]]
        finals = arm["final_score"]
        assert cells[1] == str(len(arm["seeds"]))
        assert cells[2] == f"{statistics.fmean(arm['start_score']):+.2f}"
        assert cells[3] == f"{statistics.fmean(finals):+.2f} ± {statistics.stdev(finals):.2f}"
        reach = arm["updates_to_target"]
        per_seed = ", ".join(str(x) for x in reach)
        assert cells[4] == f"{statistics.fmean(reach):.0f} ({per_seed})"
        assert cells[5] == f"{statistics.fmean(arm['final_kl']):.1f}"
        assert cells[6] == f"{statistics.fmean(arm['final_length']):.1f}"


def _arm(summary: dict[str, Any], beta_c: float) -> dict[str, Any]:
    return next(arm for arm in summary["arms"].values() if arm["beta_c"] == beta_c)


def _rl_prose() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Train a policy on the rewards") :]
    return section[: section.index("\n## ")]


def test_the_readme_prose_after_the_table_is_the_committed_runs() -> None:
    """The figures and samples the README quotes come from docs/rl and docs/rl/length32."""
    import re
    import statistics

    from tokenreward_service.demo.data import LABELS, load_corpus, split_by_text

    section = _rl_prose()
    text = " ".join(section.split())
    summary = json.loads((ROOT / "docs/rl/rl-summary.json").read_text())
    runs = {p.stem: json.loads(p.read_text()) for p in (ROOT / "docs/rl/runs").glob("*.json")}
    sparse, dense = _arm(summary, 0.0), _arm(summary, 1.0)
    assert max(dense["updates_to_target"]) < statistics.median(sparse["updates_to_target"])
    ratio = statistics.fmean(sparse["updates_to_target"]) / statistics.fmean(
        dense["updates_to_target"]
    )

    def critic(beta: str) -> str:
        losses = [
            statistics.fmean(u["value_loss"] for u in run["curves"][:10])
            for name, run in runs.items()
            if name.startswith(f"beta{beta}-")
        ]
        return f"{min(losses):.2f}–{max(losses):.2f}"

    finals = [s for run in runs.values() for s in run["samples"]["end"]]
    start = next(
        s for s in runs["beta1-seed0"]["samples"]["start"] if s["prompt"] == "no because you"
    )
    for stated in (
        f"the whole comparison took {summary['seconds'] / 60:.1f} minutes",
        "every dense seed reached 2.0 before the median sparse seed",
        f"{ratio:.2f}x fewer updates on average",
        f"first 10 updates at {critic('1')} per seed against {critic('0')} for sparse",
        f"({start['score']:+.2f})".replace("-", "\u2212"),
        f"{sum('thank' in s['response'].lower() for s in finals)} of the {len(finals)} final "
        "samples",
        f"and {sum('#coachella2015' in s['response'].lower() for s in finals)} carry the hashtag",
    ):
        assert stated in text, stated
    assert f'"no because you" -> "{start["response"]}"' in text
    # every quoted sample is an end sample of the run it names, with its score
    block = re.search(r"At the end most samples read like\n\n```text\n(.*?)```", section, re.S)
    assert block is not None
    lines = block.group(1).strip().splitlines()
    assert len(lines) >= 3
    arms = {"sparse": "0", "mixed": "0.5", "dense": "1"}
    for line in lines:
        quoted = re.fullmatch(
            r'"(.+?)"\s+-> "(.+?)"\s+score ([+-]\d+\.\d\d) \((\w+), seed (\d)\)', line
        )
        assert quoted is not None, line
        prompt, response, score, arm, seed = quoted.groups()
        run = runs[f"beta{arms[arm]}-seed{seed}"]
        assert any(
            (s["prompt"], s["response"], f"{s['score']:+.2f}") == (prompt, response, score)
            for s in run["samples"]["end"]
        ), line
    # the corpus counts behind the optimum
    train, _ = split_by_text(load_corpus(), seed=0, heldout_fraction=0.1)
    counts = {}
    for word in ("thank", "#coachella2015"):
        labels = [e.label for e in train if word in e.text.lower()]
        counts[word] = labels.count(LABELS["positive"]), labels.count(LABELS["negative"])
    thank, festival = counts["thank"], counts["#coachella2015"]
    assert (
        f'"thank" is in {thank[0]:,} positive training tweets and {thank[1]:,} negative ones, '
        f"#Coachella2015 in {festival[0]:,} and {festival[1]:,}"
    ) in text
    # the longer-response run
    long = json.loads((ROOT / "docs/rl/length32/rl-summary.json").read_text())
    parts = []
    for beta, name in ((0.0, "sparse"), (1.0, "dense")):
        arm = _arm(long, beta)
        reach = arm["updates_to_target"]
        parts.append(
            f"{name} reaches 2.0 in {statistics.fmean(reach):.0f} updates "
            f"({', '.join(map(str, reach))})"
        )
    sparse_long, dense_long = _arm(long, 0.0), _arm(long, 1.0)
    parts.append(
        "final scores "
        + " and ".join(
            f"{statistics.fmean(a['final_score']):+.2f} ± {statistics.stdev(a['final_score']):.2f}"
            for a in (sparse_long, dense_long)
        )
    )
    parts.append(
        f"end at about {statistics.fmean(sparse_long['final_length']):.0f} and "
        f"{statistics.fmean(dense_long['final_length']):.0f} tokens"
    )
    assert f"`docs/rl/length32/`, {long['seconds'] / 60:.1f} minutes" in text
    for part in parts:
        assert part in text, part
