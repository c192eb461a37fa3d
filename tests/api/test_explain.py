"""``tokenreward explain``: the response coloured by token reward, in a terminal and as HTML."""

from __future__ import annotations

import html
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import LiveServer
from tokenreward import RewardClient, RewardResult
from tokenreward.explain import render_html, render_terminal, token_colour
from tokenreward_service.config import Settings
from tokenreward_service.loading import load_reward_model

PROMPT, RESPONSE = "the movie was", " very good, but I hate it & <it> was bad"


@pytest.fixture(scope="module")
def url(text_model_dir: Path) -> Iterator[str]:
    with LiveServer(Settings(), model=load_reward_model(text_model_dir, device="cpu")) as server:
        yield server.url


def check_html(page: str, result: RewardResult) -> None:
    """Every token in order, each with its reward and a colour whose hue matches its sign."""
    spans = re.findall(
        r'<span class="tok" data-index="(\d+)" data-reward="([^"]+)" '
        r'style="background: rgb\((\d+), (\d+), (\d+)\)" title="[^"]+">(.*?)</span>',
        page,
    )
    assert [int(s[0]) for s in spans] == list(range(len(result.token_rewards)))
    assert "".join(html.unescape(s[5]) for s in spans) == RESPONSE
    for (_, value, r, g, _b, _), reward in zip(spans, result.token_rewards, strict=True):
        assert float(value) == pytest.approx(reward, rel=1e-5, abs=1e-9)
        if reward > 0:
            assert int(g) > int(r)
        elif reward < 0:
            assert int(r) > int(g)
    assert f"{result.score:+.4f}" in page


def test_explain_command_prints_and_writes_html(url: str, tmp_path: Path) -> None:
    page = tmp_path / "explain.html"
    cmd = [sys.executable, "-m", "tokenreward_service.cli", "explain", "--url", url]
    cmd += ["--html", str(page), "--no-colour", PROMPT, RESPONSE]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout
    with RewardClient(url) as client:
        (result,) = client.rewards([{"prompt": PROMPT, "response": RESPONSE}])
    assert result.response_tokens is not None
    first_line = out.splitlines()[0]
    expected = "".join(
        f"{t}[{r:+.3f}]" for t, r in zip(result.response_tokens, result.token_rewards, strict=True)
    )
    assert first_line == expected
    assert f"score {result.score:+.4f}" in out
    assert f"sum of token rewards {sum(result.token_rewards):+.4f}" in out
    check_html(page.read_text(), result)


def test_terminal_colours_follow_the_rewards(url: str) -> None:
    with RewardClient(url) as client:
        (result,) = client.rewards([{"prompt": PROMPT, "response": RESPONSE}])
    coloured = render_terminal(result)
    backgrounds = re.findall(
        r"\x1b\[48;2;(\d+);(\d+);(\d+)m\x1b\[\d+m(.*?)\x1b\[0m", coloured.splitlines()[0]
    )
    assert "".join(b[3] for b in backgrounds) == RESPONSE
    scale = max(abs(r) for r in result.token_rewards)
    for (r, g, b, _), reward in zip(backgrounds, result.token_rewards, strict=True):
        assert (int(r), int(g), int(b)) == token_colour(reward, scale)
    check_html(render_html(result, prompt=PROMPT), result)


def test_colour_scale() -> None:
    assert token_colour(0.0, 1.0) == (255, 255, 255)
    assert token_colour(1.0, 1.0) == (44, 160, 44)
    assert token_colour(-2.0, 1.0) == (214, 39, 40)  # clipped at the scale
    r, g, _ = token_colour(0.5, 1.0)
    assert 44 < r < 255
    assert g > r


def test_ids_only_results_cannot_be_explained() -> None:
    result = RewardResult(id=None, token_rewards=[0.1], score=0.1, prompt_score=0.0)
    with pytest.raises(ValueError, match="as text"):
        render_terminal(result)


def test_explain_on_the_demo_rm() -> None:
    """The embedded demo RM: the page holds every token in order, colours follow the signs,
    and the sentiment words carry the credit."""
    from tokenreward_service.app import DEMO_MODEL

    model = load_reward_model(DEMO_MODEL, device="cpu")
    text = "I love this phone, but the battery life is terrible"
    with LiveServer(Settings(), model=model) as server, RewardClient(server.url) as client:
        (result,) = client.rewards([{"prompt": "", "response": text}])
    page = render_html(result, prompt="")
    spans = re.findall(
        r'data-reward="([^"]+)" style="background: rgb\((\d+), (\d+), \d+\)"[^>]*>(.*?)</span>',
        page,
    )
    assert "".join(html.unescape(s[3]) for s in spans) == text
    scale = max(abs(float(s[0])) for s in spans)
    for value, r, g, _ in spans:
        if abs(float(value)) < 0.02 * scale:  # all but white: the hue cannot show in 8 bits
            assert min(int(r), int(g)) >= 250
        elif float(value) > 0:
            assert int(g) > int(r)
        else:
            assert int(r) > int(g)
    tokens = result.response_tokens or []
    rewards = dict(zip(tokens, result.token_rewards, strict=True))
    assert max(rewards, key=rewards.__getitem__) == " love"
    assert rewards[" terrible"] < 0
    # The README's plain-text example is this run's output, as printed.
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    shown = re.search(r"on the demo RM:\n\n```text\n(.*?)\n```", readme, flags=re.S)
    assert shown is not None
    assert shown.group(1) == render_terminal(result, colour=False)


def test_the_readme_prose_after_the_example_states_the_demo_rm_s_rewards() -> None:
    from tokenreward_service.app import DEMO_MODEL

    model = load_reward_model(DEMO_MODEL, device="cpu")
    texts = ["what a great day, thanks everyone", "the meeting is at 3pm today"]
    with LiveServer(Settings(), model=model) as server, RewardClient(server.url) as client:
        results = client.rewards([{"prompt": "", "response": text} for text in texts])
    great, meeting = (
        dict(zip(r.response_tokens or [], r.token_rewards, strict=True)) for r in results
    )
    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
    for stated in (
        f'puts {great[" great"]:+.2f} on "great" and {great[" thanks"]:+.2f} on "thanks"',
        f'"pm" takes {meeting["pm"]:+.2f}'.replace("-", "\u2212"),
    ):
        assert stated in readme, stated
