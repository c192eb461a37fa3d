"""``trl_reward_func`` inside TRL's real ``GRPOTrainer`` (trl 1.16.0 in ``.venvs/trl``).

Two runs of two optimizer steps each, on CPU, of a tiny random Llama policy that shares the
demo RM's tokenizer: one on a standard (text) dataset against ``tokenreward serve`` as it
comes, one on a conversational dataset against the same demo RM served with a chat template.
The script records every call TRL makes to the reward function; this test re-scores the same
texts with plain HTTP and checks that the function returned exactly the service's scores, in
order, and that TRL logged their mean: so a wrong, shuffled or lost score fails here. A third
run sends the conversations to the server that has no chat template: the refusal must stop
training, not turn into a reward.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integrations.conftest import ROOT, run_in
from tokenreward_service.bench.runner import SpawnedServer

DEMO = ROOT / "service" / "tokenreward_service" / "demo" / "model"
# The RM's chat template for the conversational run (the demo RM has none of its own).
RM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
# What TRL passes, "topic" being the dataset's extra column.
KWARGS = sorted(
    [
        "prompts",
        "completions",
        "completion_ids",
        "trainer_state",
        "log_extra",
        "log_metric",
        "topic",
    ]
)
METRIC = "rewards/tokenreward/mean"


def _scores(url: str, items: list[dict[str, Any]]) -> list[float]:
    """The service's scores, asked for with a raw POST (no client, no adapter)."""
    if not items:
        return []
    answer = httpx.post(f"{url}/v1/rewards", json={"items": items}, timeout=60)
    answer.raise_for_status()
    return [result["score"] for result in answer.json()["results"]]


def _expected_standard(url: str, call: dict[str, Any], tokenizer: Any) -> list[float | None]:
    items = [
        {
            "prompt_ids": tokenizer.encode(p, add_special_tokens=True),
            "response_ids": tokenizer.encode(c, add_special_tokens=False),
        }
        for p, c in zip(call["prompts"], call["completions"], strict=True)
    ]
    scores = iter(_scores(url, [i for i in items if i["response_ids"]]))
    return [next(scores) if i["response_ids"] else None for i in items]


def _expected_chat(url: str, call: dict[str, Any]) -> list[float | None]:
    responses = [c[0]["content"] for c in call["completions"]]
    items = [
        {"messages": p, "response": r} for p, r in zip(call["prompts"], responses, strict=True) if r
    ]
    scores = iter(_scores(url, items))
    return [next(scores) if r else None for r in responses]


def _check_run(run: dict[str, Any], expected: Sequence[list[float | None]]) -> None:
    assert run["error"] is None
    assert run["global_step"] == 2
    assert run["reward_func_names"] == ["tokenreward"]
    assert run["weights_changed"] > 0
    assert run["max_weight_change"] > 0
    calls = run["calls"]
    assert [call["global_step"] for call in calls] == [0, 1]  # one generation batch per step
    logged = [entry for entry in run["log_history"] if METRIC in entry]
    assert len(logged) == 2
    for call, want, entry in zip(calls, expected, logged, strict=True):
        assert call["kwargs"] == KWARGS
        assert len(call["prompts"]) == len(call["completions"]) == len(call["completion_ids"]) == 8
        assert call["prompts"][0::2] == call["prompts"][1::2]  # each prompt, num_generations=2
        # What the function returned is the service's score of each completion, in order ...
        assert [x is None for x in call["returned"]] == [x is None for x in want]
        got = [x for x in call["returned"] if x is not None]
        assert got == pytest.approx([x for x in want if x is not None], abs=1e-5)
        # ... and TRL logged their mean (None left out), as the reward of the step.
        mean = math.fsum(got) / len(got)
        assert entry[METRIC] == pytest.approx(mean, abs=1e-5)
        assert entry["reward"] == pytest.approx(mean, abs=1e-5)


def test_trl_grpo_trainer(
    serve: Callable[[Sequence[str]], SpawnedServer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    template = tmp_path / "rm-chat.jinja"
    template.write_text(RM_TEMPLATE)
    plain = serve([])
    chat = serve(["--chat-template", str(template)])
    started = time.monotonic()
    result = run_in(
        "trl",
        "trl_grpo.py",
        *("--url", plain.url, "--chat-url", chat.url),
        *("--rm-tokenizer", str(DEMO), "--out", str(tmp_path / "out")),
    )
    print(
        f"[trl] trl {result['trl']}, transformers {result['transformers']}, torch {result['torch']}"
    )
    print(f"[trl] three runs in {time.monotonic() - started:.0f} s (environment included)")
    assert result["trl"] == "1.16.0"
    assert "/.venvs/trl/" in result["trl_file"]
    rm_tokenizer = AutoTokenizer.from_pretrained(DEMO)

    # Standard dataset: text prompts, and completions decoded from the policy's tokens.
    standard = result["standard"]
    for call in standard["calls"]:
        assert all(isinstance(p, str) for p in call["prompts"])
        assert all(isinstance(c, str) for c in call["completions"])
    assert standard["decoded_completion_ids"] == [
        c for call in standard["calls"] for c in call["completions"]
    ]
    _check_run(
        standard, [_expected_standard(plain.url, call, rm_tokenizer) for call in standard["calls"]]
    )

    # Conversational dataset: turn lists in, one assistant turn out per completion; the EOS
    # bias makes some completions empty, which score None (TRL: unscorable, zero advantage).
    conversational = result["conversational"]
    returned = [x for call in conversational["calls"] for x in call["returned"]]
    assert None in returned
    assert any(x is not None for x in returned)
    for call in conversational["calls"]:
        assert all([t["role"] for t in p] == ["system", "user"] for p in call["prompts"])
        assert all(len(c) == 1 and c[0]["role"] == "assistant" for c in call["completions"])
    assert conversational["decoded_completion_ids"] == [
        c[0]["content"] for call in conversational["calls"] for c in call["completions"]
    ]
    _check_run(conversational, [_expected_chat(chat.url, call) for call in conversational["calls"]])

    # The same conversations against the server without a chat template: the service refuses
    # (422), the client raises, and TRL lets the error end training before its first step.
    refused = result["refused"]
    assert refused["error"]["type"] == "InvalidRequestError"
    assert "no chat template" in refused["error"]["text"]
    assert refused["global_step"] == 0
    assert refused["weights_changed"] == 0
    assert refused["calls"] == []
    assert not [entry for entry in refused["log_history"] if METRIC in entry]
