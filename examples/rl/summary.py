"""The comparison's summary: final scores per arm, the updates each arm needs to reach a fixed
score, sample texts, and the curves drawn (mean over seeds, shaded from the lowest to the
highest seed)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

TARGET_SCORE = 2.0
"""The fixed score of "updates to reach": a 10-update moving average of the mean RM score."""
WINDOW = 10
METRICS = (
    ("score", "mean RM score of fresh samples"),
    ("kl", "KL to the reference (per response)"),
    ("length", "response length (policy tokens)"),
    ("value_loss", "value loss"),
)


def moving_average(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def arm_name(beta_c: float) -> str:
    return {0.0: "sparse", 1.0: "dense"}.get(beta_c, "mix") + f" (β_c={beta_c:g})"


def summarise(
    results: list[dict[str, Any]], out: Path, *, target: float = TARGET_SCORE
) -> dict[str, Any]:
    by_arm: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        by_arm[result["config"]["beta_c"]].append(result)
    arms: dict[str, Any] = {}
    table = [
        "| arm | seeds | start score | final score (last 10, mean ± sd) | updates to reach "
        f"{target:g} | final KL | final length |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for beta_c in sorted(by_arm):
        runs = sorted(by_arm[beta_c], key=lambda r: r["config"]["seed"])
        finals = [statistics.fmean(c["score"] for c in r["curves"][-WINDOW:]) for r in runs]
        starts = [r["curves"][0]["score"] for r in runs]
        reach = []
        for r in runs:
            smooth = moving_average([c["score"] for c in r["curves"]], WINDOW)
            reach.append(next((i + 1 for i, v in enumerate(smooth) if v >= target), None))
        kl = [statistics.fmean(c["kl"] for c in r["curves"][-WINDOW:]) for r in runs]
        length = [statistics.fmean(c["length"] for c in r["curves"][-WINDOW:]) for r in runs]
        arms[arm_name(beta_c)] = {
            "beta_c": beta_c,
            "seeds": [r["config"]["seed"] for r in runs],
            "start_score": starts,
            "final_score": finals,
            "updates_to_target": reach,
            "final_kl": kl,
            "final_length": length,
            "samples": {str(r["config"]["seed"]): r["samples"] for r in runs},
        }
        sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
        reached = [x for x in reach if x is not None]
        reach_text = (
            f"{statistics.fmean(reached):.0f} ({len(reached)}/{len(reach)} seeds)"
            if reached
            else f"not reached (0/{len(reach)})"
        )
        table.append(
            f"| {arm_name(beta_c)} | {len(runs)} | {statistics.fmean(starts):+.3f} | "
            f"{statistics.fmean(finals):+.3f} ± {sd:.3f} | {reach_text} | "
            f"{statistics.fmean(kl):.2f} | {statistics.fmean(length):.1f} |"
        )
    picture = draw(by_arm, out / "rl-curves.png")
    return {
        "target_score": target,
        "window": WINDOW,
        "arms": arms,
        "table": table,
        "picture": str(picture),
    }


def draw(by_arm: dict[float, list[dict[str, Any]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (key, title) in zip(axes.flat, METRICS, strict=True):
        for beta_c in sorted(by_arm):
            runs = by_arm[beta_c]
            length = min(len(r["curves"]) for r in runs)
            series = [moving_average([c[key] for c in r["curves"][:length]], 5) for r in runs]
            mean = [statistics.fmean(col) for col in zip(*series, strict=True)]
            low = [min(col) for col in zip(*series, strict=True)]
            high = [max(col) for col in zip(*series, strict=True)]
            steps = list(range(1, length + 1))
            (line,) = ax.plot(steps, mean, label=arm_name(beta_c))
            ax.fill_between(steps, low, high, alpha=0.2, color=line.get_color())
        ax.set_title(title)
        ax.set_xlabel("PPO update")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle(
        "PPO on the demo RM: dense (RED) vs sparse rewards, mean over seeds (band: min-max)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
