"""The trainer integrations against a real server: vLLM outputs, learner tensors, scalar reward
functions for OpenRLHF and TRL (TRL's own GRPOTrainer runs them in tests/integrations)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.support import LiveServer
from tokenreward import RewardClient, RewardResult
from tokenreward.integrations.learner import dense_rewards, ppo_token_rewards
from tokenreward.integrations.trainers import openrlhf_reward_func, trl_reward_func
from tokenreward.integrations.vllm import items_from_vllm, rewards_by_request
from tokenreward.protocol import Message, RewardItem
from tokenreward_service.config import Settings
from tokenreward_service.loading import load_reward_model
from tokenreward_service.model import RewardModel


# vLLM cannot be installed here (CUDA-only wheels, pins that conflict with this stack), so these
# stand-ins carry exactly the documented fields the adapter reads from vllm.RequestOutput and
# vllm.CompletionOutput, plus a few it must ignore.
@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: tuple[int, ...]
    cumulative_logprob: float | None = None
    logprobs: Any = None
    finish_reason: str | None = "stop"
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    finished: bool = True
    metrics: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def server(llama: RewardModel) -> Iterator[LiveServer]:
    with LiveServer(Settings(), model=llama) as live:
        yield live


def test_vllm_outputs_to_items_and_back(server: LiveServer) -> None:
    outputs = [
        RequestOutput(
            "req-0",
            "p0",
            [1, 5, 6],
            None,
            [CompletionOutput(1, "b", (9, 9, 2)), CompletionOutput(0, "a", (7, 8))],  # out of order
        ),
        RequestOutput("req-1", "p1", [1, 4], None, [CompletionOutput(0, "c", (3,))]),
    ]
    items = items_from_vllm(outputs)
    assert [(i.id, i.prompt_ids, i.response_ids) for i in items] == [
        ("req-0/0", [1, 5, 6], [7, 8]),
        ("req-0/1", [1, 5, 6], [9, 9, 2]),
        ("req-1/0", [1, 4], [3]),
    ]
    with RewardClient(server.url) as client:
        results = client.rewards(items)
        grouped = rewards_by_request(outputs, results)
        direct = client.rewards([([1, 5, 6], [9, 9, 2])])[0]
    assert [[len(r.token_rewards) for r in g] for g in grouped] == [[2, 3], [1]]
    assert grouped[0][1].token_rewards == pytest.approx(direct.token_rewards, abs=1e-5)
    with pytest.raises(ValueError, match="expected 'req-0/0'"):
        rewards_by_request(outputs, list(reversed(results)))
    with pytest.raises(ValueError, match="no prompt_token_ids"):
        items_from_vllm([RequestOutput("x", None, None, None, [])])


def _results(*rows: list[float]) -> list[RewardResult]:
    return [
        RewardResult(id=None, token_rewards=row, score=sum(row), prompt_score=0.0) for row in rows
    ]


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_dense_rewards_and_the_ppo_reward(backend: str) -> None:
    results = _results([1.0, 2.0, 3.0], [4.0])
    rewards, mask = dense_rewards(results, backend=backend)  # type: ignore[arg-type]
    lib: Any = torch if backend == "torch" else np
    assert isinstance(rewards, torch.Tensor if backend == "torch" else np.ndarray)
    assert rewards.tolist() == [[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    old = lib.full((2, 3), -1.0)
    ref = lib.full((2, 3), -1.5)
    r = ppo_token_rewards(rewards, old, ref, mask, beta=0.1)
    expected = [[1.0 - 0.05, 2.0 - 0.05, 3.0 - 0.05], [4.0 - 0.05, 0.0, 0.0]]
    assert np.allclose(np.asarray(r.tolist()), expected)
    padded, padded_mask = dense_rewards(results, pad_to=5, backend=backend)  # type: ignore[arg-type]
    assert tuple(padded.shape) == (2, 5)
    assert padded_mask.sum().item() == 4
    with pytest.raises(ValueError, match="pad_to"):
        dense_rewards(results, pad_to=2)
    with pytest.raises(ValueError, match="same shape"):
        ppo_token_rewards(rewards, old[:, :2], ref, mask, beta=0.1)


class WordTokenizer:
    """A real Hugging Face fast tokenizer (word level) built here, with a BOS it adds itself."""

    def __init__(self) -> None:
        from tokenizers import Tokenizer, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "[UNK]": 3}
        words = ["the", "a", "good", "bad", "movie", "was", "is", "very", "not", "2", "+", "4", "="]
        vocab.update({word: i + 4 for i, word in enumerate(words)})
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)]
        )
        self.hf = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = self.hf.encode(text, add_special_tokens=add_special_tokens)
        return ids


def test_openrlhf_and_trl_reward_functions(server: LiveServer) -> None:
    tokenizer = WordTokenizer()
    with RewardClient(server.url) as client:
        reference = client.rewards(
            [
                (
                    tokenizer.encode("the movie was"),
                    tokenizer.encode(" very good", add_special_tokens=False),
                ),
                (tokenizer.encode("2 + 2 ="), tokenizer.encode(" 4", add_special_tokens=False)),
            ]
        )
        openrlhf = openrlhf_reward_func(client, tokenizer)
        scores = openrlhf(
            ["the movie was very good", "2 + 2 = 4"], ["the movie was", "2 + 2 ="], None
        )
        assert isinstance(scores, torch.Tensor)
        assert scores.tolist() == pytest.approx([r.score for r in reference], abs=1e-6)

        trl = trl_reward_func(client, tokenizer)
        assert trl.__name__ == "tokenreward"
        plain = trl(
            prompts=["the movie was", "2 + 2 ="],
            completions=[" very good", " 4"],
            answer=["x", "y"],
        )
    assert plain == pytest.approx([r.score for r in reference], abs=1e-6)


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@pytest.fixture(scope="module")
def chat_server(text_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tiny RM with its byte-level tokenizer, served with a plain-text chat template."""
    template = tmp_path_factory.mktemp("chat") / "template.jinja"
    template.write_text(CHAT_TEMPLATE)
    model = load_reward_model(text_model_dir, device="cpu", dtype="float32")
    with LiveServer(Settings(chat_template=str(template)), model=model) as live:
        yield live.url


def test_trl_conversations_go_as_messages(chat_server: str, text_model_dir: Path) -> None:
    """TRL's chat format (turn lists, TRL >= 1 passes them for conversational datasets) is
    rendered by the RM's chat template on the server, system turn and roles included: as TRL
    renders it for a reward model it runs itself, never the turns' contents glued together."""
    from transformers import AutoTokenizer

    system = {"role": "system", "content": "Be kind."}
    prompts = [[system, {"role": "user", "content": "the movie was"}]] * 2
    completions = [
        [{"role": "assistant", "content": " very good"}],
        [
            {
                "role": "assistant",
                "content": [{"type": "text", "text": " very "}, {"type": "text", "text": "bad"}],
            }
        ],
    ]
    with RewardClient(chat_server) as client:
        trl = trl_reward_func(client, AutoTokenizer.from_pretrained(text_model_dir))
        scores = trl(prompts=prompts, completions=completions, completion_ids=[[5], [6]])
        messages = [
            Message(role="system", content="Be kind."),
            Message(role="user", content="the movie was"),
        ]
        reference = client.rewards(
            [RewardItem(messages=messages, response=r) for r in (" very good", " very bad")]
        )
        glued = client.rewards([RewardItem(prompt="Be kind.the movie was", response=" very good")])
    assert scores == pytest.approx([r.score for r in reference], abs=1e-6)
    assert scores[0] != pytest.approx(glued[0].score, abs=1e-6)


def test_trl_empty_completions_are_unscorable(chat_server: str, text_model_dir: Path) -> None:
    """A completion that is only EOS decodes to ''; the service needs one response token, so it
    is None (TRL: unscorable, zero advantage) or the caller's ``empty``, and the others keep
    their scores and their order."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_model_dir)
    user = [{"role": "user", "content": "the movie was"}]
    with RewardClient(chat_server) as client:
        reference = client.rewards(
            [(tokenizer.encode("a"), tokenizer.encode(" bad", add_special_tokens=False))]
        )
        trl = trl_reward_func(client, tokenizer)
        plain = trl(prompts=["a", "a", "a"], completions=["", " bad", ""])
        penalised = trl_reward_func(client, tokenizer, empty=-1.0)(
            prompts=["a", "a"], completions=["", " bad"]
        )
        chat = trl(prompts=[user, user], completions=[[{"role": "assistant", "content": ""}]] * 2)
    assert plain == [None, pytest.approx(reference[0].score, abs=1e-6), None]
    assert penalised == [-1.0, pytest.approx(reference[0].score, abs=1e-6)]
    assert chat == [None, None]


@pytest.mark.parametrize(
    ("prompt", "completion", "error"),
    [
        (
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}]}],
            [{"role": "assistant", "content": "b"}],
            "reads text only; a turn holds image, text",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "tool", "content": "42"}],
            [{"role": "assistant", "content": "b"}],
            "got 'tool'",
        ),
        ([{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}], "not 'user'"),
        ("a", [{"role": "assistant", "content": "b"}], "completion is text"),
        ([{"role": "user", "content": "a"}], "b", "list of chat turns"),
    ],
)
def test_trl_refuses_what_the_rm_cannot_read(prompt: Any, completion: Any, error: str) -> None:
    """Refused before anything is sent (the URL is never reached), never scored as something
    else: images, tool turns, a completion that is not the assistant's."""
    with RewardClient("http://127.0.0.1:9") as client:
        trl = trl_reward_func(client, WordTokenizer())
        with pytest.raises((ValueError, TypeError), match=error):
            trl(prompts=[prompt], completions=[completion])
