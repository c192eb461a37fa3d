"""Custom architectures and adapters: ``--trust-remote-code`` and ``--adapter``.

The custom model is a folder built here with its own code (``modeling_gated_rm.py`` and an
``auto_map`` in ``config.json``, as published custom RMs ship), a gated multi-objective head
that is not one linear layer; the shipped adapter ``tokenreward_service.adapters.gated`` reads
it. The reference is the model's own forward (its own code, via transformers) on each prefix.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from tests.support import LiveServer
from tokenreward_service.app import load_model
from tokenreward_service.cli import build_parser
from tokenreward_service.config import Settings
from tokenreward_service.errors import ModelLoadError
from tokenreward_service.loading import load_reward_model
from tokenreward_service.tiny import save_causal_lm, save_gated_reward_model

TOLERANCE = 1e-4
GATED = "tokenreward_service.adapters.gated:scores"
REWARD_TOKEN = 7


@pytest.fixture(scope="module")
def gated_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_gated_reward_model(tmp_path_factory.mktemp("rm-gated"), seed=2, num_objectives=4)


def _items(vocab: int, seed: int) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    group = ids(10)  # a GRPO-style group: three responses to one prompt
    return [(ids(4), ids(9)), (group, ids(5)), (group, ids(12)), (group, ids(1)), (ids(1), ids(7))]


def _check_against(
    results: list[dict[str, object]],
    items: list[tuple[list[int], list[int]]],
    reference: Callable[[Sequence[int]], list[float]],
) -> None:
    worst = 0.0
    for (prompt, response), result in zip(items, results, strict=True):
        prefix = reference([*prompt, *response])
        served = result["prefix_scores"]
        assert isinstance(served, list)
        assert len(served) == len(response)
        worst = max(
            worst, *(abs(a - b) for a, b in zip(served, prefix[len(prompt) :], strict=True))
        )
        prompt_score = result["prompt_score"]
        assert isinstance(prompt_score, float)
        worst = max(worst, abs(prompt_score - prefix[len(prompt) - 1]))
    assert worst <= TOLERANCE
    assert len({round(float(s), 3) for r in results for s in r["prefix_scores"]}) > 10  # type: ignore[attr-defined]


def test_a_folder_with_its_own_code_is_refused_without_trust_remote_code(gated_dir: Path) -> None:
    config = json.loads((gated_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSequenceClassification"] == (
        "modeling_gated_rm.GatedRewardModel"
    )
    assert (gated_dir / "modeling_gated_rm.py").is_file()
    with pytest.raises(ModelLoadError) as refused:
        load_reward_model(gated_dir, device="cpu", adapter=GATED)
    message = str(refused.value)
    assert "ships its own model code" in message
    assert "modeling_gated_rm.GatedRewardModel" in message
    assert "--trust-remote-code" in message


def test_custom_code_whose_head_is_not_linear_needs_an_adapter(gated_dir: Path) -> None:
    with pytest.raises(
        ModelLoadError, match=r"GatedRewardModel .* no linear 'score' head.*--adapter"
    ):
        load_reward_model(gated_dir, device="cpu", trust_remote_code=True)


@contextmanager
def serve(argv: list[str]) -> Iterator[str]:
    """``tokenreward serve ARGV`` in this process: the real parser, Settings and app, whose
    lifespan loads the model; yields the URL once ``/readyz`` says it is loaded."""
    options = vars(build_parser().parse_args(["serve", *argv]))
    del options["command"]
    with LiveServer(Settings(**options)) as server:
        deadline = time.monotonic() + 60
        while (ready := httpx.get(f"{server.url}/readyz")).status_code != 200:
            assert "could not" not in ready.text, ready.text
            assert time.monotonic() < deadline, "the model did not load in time"
            time.sleep(0.02)
        yield server.url


def test_tokenreward_serve_runs_the_gated_rm_with_its_adapter(gated_dir: Path) -> None:
    """The command line's flags: ``--trust-remote-code --adapter MODULE:FUNCTION``."""
    from transformers import AutoModelForSequenceClassification

    items = _items(128, seed=1)
    body = {
        "items": [{"prompt_ids": p, "response_ids": r} for p, r in items],
        "return_prefix_scores": True,
    }
    args = ["--model", str(gated_dir), "--trust-remote-code", "--adapter", GATED]
    with serve([*args, "--device", "cpu"]) as url:
        info = httpx.get(f"{url}/v1/model").json()
        response = httpx.post(f"{url}/v1/rewards", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert info["format"] == "adapter"
    assert info["head"] == f"adapter {GATED}"
    assert info["architecture"] == "GatedRewardModel"
    own = AutoModelForSequenceClassification.from_pretrained(
        gated_dir, trust_remote_code=True, dtype=torch.float32
    ).eval()

    def reference(sequence: Sequence[int]) -> list[float]:
        with torch.inference_mode():
            return [
                float(own(input_ids=torch.tensor([list(sequence[:k])])).logits[0, 0])
                for k in range(1, len(sequence) + 1)
            ]

    _check_against(response.json()["results"], items, reference)


READ_TOKEN = f"""
import torch

def scores(model, input_ids, attention_mask):
    '''An RM read at a dedicated reward token: the logit of token {REWARD_TOKEN}.'''
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits[..., {REWARD_TOKEN}].float()

def future(model, input_ids, attention_mask):
    '''Not causal: every position sees the sum of what follows.'''
    s = scores(model, input_ids, attention_mask)
    return s.flip(-1).cumsum(-1).flip(-1)

def pooled(model, input_ids, attention_mask):
    return scores(model, input_ids, attention_mask).mean(-1)
"""


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_causal_lm(tmp_path_factory.mktemp("lm"), seed=4)


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("adapter") / "reward_token.py"
    path.write_text(READ_TOKEN)
    return path


def test_an_adapter_file_reads_a_reward_token_of_a_causal_lm(
    lm_dir: Path, adapter_file: Path
) -> None:
    """A causal LM has no head (refused on its own); a file adapter makes it an RM."""
    from transformers import AutoModelForCausalLM

    model = load_model(Settings(model=str(lm_dir), device="cpu", adapter=str(adapter_file)))
    assert model.spec.format == "adapter"
    assert model.spec.architecture == "LlamaForCausalLM"
    assert model.share_prompts is False  # an adapter hides the cache a shared prompt needs
    items = _items(128, seed=2)
    body = {
        "items": [{"prompt_ids": p, "response_ids": r} for p, r in items],
        "return_prefix_scores": True,
    }
    with LiveServer(Settings(), model=model) as server:
        response = httpx.post(f"{server.url}/v1/rewards", json=body, timeout=60)
    assert response.status_code == 200, response.text
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()

    def reference(sequence: Sequence[int]) -> list[float]:
        with torch.inference_mode():
            return [
                float(lm(input_ids=torch.tensor([list(sequence[:k])])).logits[0, -1, REWARD_TOKEN])
                for k in range(1, len(sequence) + 1)
            ]

    _check_against(response.json()["results"], items, reference)


def test_adapters_that_cannot_serve_are_refused(lm_dir: Path, adapter_file: Path) -> None:
    def refused(adapter: str, **options: object) -> str:
        with pytest.raises(ModelLoadError) as error:
            load_reward_model(lm_dir, device="cpu", adapter=adapter, **options)  # type: ignore[arg-type]
        return str(error.value)

    assert "is not causal" in refused(f"{adapter_file}:future")
    assert "one score per position, [batch, seq]" in refused(f"{adapter_file}:pooled")
    assert "has no function 'missing'" in refused(f"{adapter_file}:missing")
    assert "cannot be imported" in refused("no_such_package.adapter:scores")
    assert "does not exist" in refused("/nonexistent/adapter.py")
    assert "the adapter computes the one score" in refused(str(adapter_file), objective=0)
