"""Show token credit: a response with each token coloured by its reward.

Used by ``tokenreward explain``; works on any :class:`RewardResult` of a text item (one that
carries ``response_tokens``). The scale is diverging and symmetric: red lowered the score,
green raised it, white is neutral, and the strongest token of either sign sets the full colour.
"""

from __future__ import annotations

import html

from tokenreward.protocol import RewardResult

__all__ = ["render_html", "render_terminal", "token_colour"]

_NEGATIVE = (214, 39, 40)
_POSITIVE = (44, 160, 44)


def _scale(rewards: list[float]) -> float:
    return max((abs(r) for r in rewards), default=0.0) or 1.0


def token_colour(reward: float, scale: float) -> tuple[int, int, int]:
    """White blended towards green (positive) or red (negative) by ``|reward| / scale``."""
    strength = min(1.0, abs(reward) / scale) if scale > 0 else 0.0
    target = _POSITIVE if reward > 0 else _NEGATIVE
    r, g, b = (round(255 + (c - 255) * strength) for c in target)
    return r, g, b


def _tokens(result: RewardResult) -> list[str]:
    if result.response_tokens is None:
        raise ValueError("the result has no response_tokens: send the item as text")
    return result.response_tokens


def _summary(result: RewardResult) -> list[str]:
    total = sum(result.token_rewards)
    lines = [f"score {result.score:+.4f}"]
    if result.prompt_score is not None:
        lines.append(f"prompt score {result.prompt_score:+.4f}")
    lines.append(f"sum of token rewards {total:+.4f}")
    return lines


def _ranked(
    result: RewardResult, count: int
) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    pairs = list(zip(_tokens(result), result.token_rewards, strict=True))
    raised = sorted((p for p in pairs if p[1] > 0), key=lambda p: -p[1])[:count]
    lowered = sorted((p for p in pairs if p[1] < 0), key=lambda p: p[1])[:count]
    return raised, lowered


def render_terminal(result: RewardResult, *, colour: bool = True, top: int = 5) -> str:
    """The response with 24-bit ANSI background colours, a legend, and the tokens that moved the
    score most. ``colour=False`` marks each token with its reward in brackets instead."""
    tokens = _tokens(result)
    scale = _scale(result.token_rewards)
    parts = []
    for token, reward in zip(tokens, result.token_rewards, strict=True):
        if colour:
            r, g, b = token_colour(reward, scale)
            fg = "30" if (r + g + b) > 380 else "97"
            parts.append(f"\x1b[48;2;{r};{g};{b}m\x1b[{fg}m{token}\x1b[0m")
        else:
            parts.append(f"{token}[{reward:+.3f}]")
    lines = ["".join(parts), ""]
    if colour:
        swatch = "".join(
            f"\x1b[48;2;{r};{g};{b}m  \x1b[0m"
            for r, g, b in (token_colour(x * scale, scale) for x in (-1, -0.5, 0, 0.5, 1))
        )
        lines.append(
            f"{swatch}  red lowered the score, green raised it (full colour = {scale:.4f})"
        )
    lines.append(" | ".join(_summary(result)))
    raised, lowered = _ranked(result, top)
    if raised:
        lines.append("raised:  " + ", ".join(f"{t.strip() or repr(t)} {r:+.4f}" for t, r in raised))
    if lowered:
        lines.append(
            "lowered: " + ", ".join(f"{t.strip() or repr(t)} {r:+.4f}" for t, r in lowered)
        )
    return "\n".join(lines)


def render_html(result: RewardResult, *, prompt: str = "", title: str = "tokenreward") -> str:
    """A self-contained HTML page: the prompt, the response with one coloured span per token
    (its reward in the tooltip and a data attribute), a colour legend and the scores."""
    tokens = _tokens(result)
    scale = _scale(result.token_rewards)
    spans = []
    for index, (token, reward) in enumerate(zip(tokens, result.token_rewards, strict=True)):
        r, g, b = token_colour(reward, scale)
        spans.append(
            f'<span class="tok" data-index="{index}" data-reward="{reward:.6g}" '
            f'style="background: rgb({r}, {g}, {b})" title="{reward:+.4f}">'
            f"{html.escape(token)}</span>"
        )
    legend = "".join(
        f'<span class="sw" style="background: rgb{token_colour(x * scale, scale)}"></span>'
        for x in (-1, -0.5, 0, 0.5, 1)
    )
    raised, lowered = _ranked(result, 5)

    def listing(pairs: list[tuple[str, float]]) -> str:
        return ", ".join(f"<code>{html.escape(t)}</code> {r:+.4f}" for t, r in pairs) or "none"

    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; color: #222; }}
.prompt {{ color: #666; white-space: pre-wrap; }}
.response {{ font-size: 1.3rem; line-height: 2.2rem; white-space: pre-wrap; }}
.tok {{ padding: 0.15rem 0; border-radius: 0.2rem; }}
.sw {{ display: inline-block; width: 1.5rem; height: 1rem; border: 1px solid #ccc; }}
.legend, .scores {{ margin-top: 1rem; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<div class="prompt">{html.escape(prompt)}</div>
<div class="response">{"".join(spans)}</div>
<div class="legend">{legend} red lowered the score, green raised it
(full colour = {scale:.4f})</div>
<div class="scores">{" &middot; ".join(_summary(result))}</div>
<p>Raised most: {listing(raised)}<br>Lowered most: {listing(lowered)}</p>
</body></html>
"""
