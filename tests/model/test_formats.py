"""Reward models as they are published: OpenRLHF's and TRL's value heads, multi-objective heads,
and the refusals that say what was looked for.

Each model is built here in its trainer's exact on-disk format (see ``tokenreward_service.tiny``),
loaded through ``tokenreward serve``'s path (``Settings`` -> ``app.load_model`` ->
``load_reward_model``), served by a real uvicorn, and checked against a reference computed
without the service: plain transformers run on each prefix separately, with the head's weights
read from the files and the head and normalisation applied by hand.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file

from tests.support import LiveServer, expected_rewards, reference_prefix_scores
from tokenreward_service.app import load_model
from tokenreward_service.config import Settings
from tokenreward_service.errors import ModelLoadError
from tokenreward_service.loading import load_reward_model
from tokenreward_service.model import RewardModel
from tokenreward_service.tiny import (
    save_causal_lm,
    save_openrlhf_reward_model,
    save_tiny_reward_model,
    save_trl_value_head_model,
    tiny_config,
)

TOLERANCE = 1e-4
CASES = [([5, 9, 17, 33], [40, 41, 7, 100, 3]), ([64] * 10, [12, 13]), ([3], [90] * 6)]


def _served(model: RewardModel, baseline: str = "prompt") -> tuple[dict[str, Any], list[Any]]:
    body = {
        "items": [{"prompt_ids": p, "response_ids": r} for p, r in CASES],
        "baseline": baseline,
        "return_prefix_scores": True,
    }
    with LiveServer(Settings(), model=model) as server:
        info = httpx.get(f"{server.url}/v1/model").json()
        response = httpx.post(f"{server.url}/v1/rewards", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return info, response.json()["results"]


def _assert_matches(results: list[Any], reference: Any, suffix: Sequence[int] = ()) -> None:
    """Served prefix scores, token rewards, score and prompt score equal those of
    ``reference(sequence) -> per-prefix scores`` within TOLERANCE (read after ``suffix``)."""
    for (prompt, response), result in zip(CASES, results, strict=True):
        prefix = reference([*prompt, *response, *suffix])
        rewards, score, prompt_score = expected_rewards(
            prefix, len(prompt), len(response), beta_c=1.0, baseline="prompt"
        )
        served = prefix[len(prompt) : len(prompt) + len(response)]
        served[-1] = score  # the suffix's increment folds into the last response token
        assert result["prefix_scores"] == pytest.approx(served, abs=TOLERANCE)
        assert result["token_rewards"] == pytest.approx(rewards, abs=TOLERANCE)
        assert result["score"] == pytest.approx(score, abs=TOLERANCE)
        assert result["prompt_score"] == pytest.approx(prompt_score, abs=TOLERANCE)
    spread = {round(r, 3) for result in results for r in result["token_rewards"]}
    assert len(spread) > 8  # not trivially equal


def _backbone_reference(
    folder: Path,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    causal_lm: bool = False,
) -> Any:
    """Per prefix: plain transformers' last hidden state at the prefix's last token, the head
    applied by hand in float64, then ``(s - mean) / std``. For a TRL model the LM runs as TRL
    runs it (``AutoModelForCausalLM``, ``hidden_states[-1]``)."""
    from transformers import AutoModel, AutoModelForCausalLM

    loader = AutoModelForCausalLM if causal_lm else AutoModel
    model = loader.from_pretrained(folder, dtype=torch.float32).eval()
    w = weight.to(torch.float64).reshape(-1)
    b = 0.0 if bias is None else float(bias.reshape(-1)[0])

    def reference(sequence: Sequence[int]) -> list[float]:
        out = []
        with torch.inference_mode():
            for k in range(1, len(sequence) + 1):
                ids = torch.tensor([list(sequence[:k])])
                if causal_lm:
                    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
                else:
                    hidden = model(input_ids=ids).last_hidden_state
                raw = float(hidden[0, -1].to(torch.float64) @ w) + b
                out.append((raw - mean) / std)
        return out

    return reference


@pytest.mark.parametrize(
    ("architecture", "prefix", "normalize", "flag"),
    [
        ("llama", "score", False, None),  # train_rm's output, served as is
        (
            "llama",
            "value_head",
            False,
            True,
        ),  # --normalize-reward true (= --reward.normalize_enable)
        ("gpt2", "score", True, None),  # config.json says normalize_reward: true
    ],
)
def test_openrlhf_reward_model_equals_per_prefix_reference(
    tmp_path: Path, architecture: str, prefix: str, normalize: bool, flag: bool | None
) -> None:
    mean, std = 0.7, 2.5
    folder = save_openrlhf_reward_model(
        tmp_path,
        architecture,
        value_head_prefix=prefix,
        normalize_reward=normalize,
        mean=mean,
        std=std,
    )
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["RewardModel"]
    assert config["value_head_prefix"] == prefix
    assert (config["mean"], config["std"], config["normalize_reward"]) == (mean, std, normalize)
    weights = load_file(folder / "model.safetensors")
    assert f"{prefix}.weight" in weights
    assert any(k.startswith(("model.", "transformer.")) for k in weights)

    model = load_model(Settings(model=str(folder), device="cpu", normalize_reward=flag))
    info, results = _served(model)
    normalised = bool(flag) or normalize
    assert info["format"] == "openrlhf"
    assert info["suffix_ids"] == [2]  # read at EOS, as OpenRLHF's RewardDataset trains it
    assert info["head"] == prefix
    assert info["normalization"] == ("(score - 0.7) / 2.5" if normalised else None)
    reference = _backbone_reference(
        folder,
        weights[f"{prefix}.weight"],
        mean=mean if normalised else 0.0,
        std=std if normalised else 1.0,
    )
    _assert_matches(results, reference, suffix=[2])


def test_normalisation_divides_token_rewards_by_std_and_shifts_only_scores(
    tmp_path: Path,
) -> None:
    """What ``normalize_reward`` does to per-token rewards: every prefix score becomes
    ``(s - mean) / std``, so token rewards (differences) are divided by ``std`` and the mean
    cancels; ``score`` and ``prompt_score`` are shifted and scaled like any score. With
    ``baseline="zero"`` the first token reward is ``s_1'`` itself, so it keeps ``-mean/std``,
    and the rewards sum to the normalised score."""
    mean, std = 1.5, 4.0
    folder = save_openrlhf_reward_model(tmp_path, mean=mean, std=std, seed=3)
    raw_model = load_reward_model(folder, device="cpu", normalize_reward=False)
    norm_model = load_reward_model(folder, device="cpu", normalize_reward=True)
    for baseline in ("prompt", "zero"):
        _, raw = _served(raw_model, baseline)
        _, norm = _served(norm_model, baseline)
        for r, n in zip(raw, norm, strict=True):
            assert n["score"] == pytest.approx((r["score"] - mean) / std, abs=1e-5)
            assert n["prompt_score"] == pytest.approx((r["prompt_score"] - mean) / std, abs=1e-5)
            expected = [t / std for t in r["token_rewards"]]
            if baseline == "zero":
                expected[0] = (r["token_rewards"][0] - mean) / std
                assert sum(n["token_rewards"]) == pytest.approx(n["score"], abs=1e-5)
            else:
                assert sum(n["token_rewards"]) == pytest.approx(
                    n["score"] - n["prompt_score"], abs=1e-5
                )
            assert n["token_rewards"] == pytest.approx(expected, abs=1e-5)


def test_normalisation_without_mean_and_std_is_refused(tmp_path: Path) -> None:
    folder = save_openrlhf_reward_model(tmp_path)  # saved before any evaluation
    with pytest.raises(ModelLoadError, match=r"no 'mean' and 'std'"):
        load_reward_model(folder, device="cpu", normalize_reward=True)


@pytest.mark.parametrize("sharded", [False, True])
def test_trl_value_head_model_equals_per_prefix_reference(tmp_path: Path, sharded: bool) -> None:
    folder = save_trl_value_head_model(tmp_path, max_shard_size="20KB" if sharded else None)
    if sharded:
        index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        head_file = index["v_head.summary.weight"]
        assert head_file != index["model.embed_tokens.weight"]  # a file apart from the LM's
        weights = load_file(folder / head_file)
    else:
        weights = load_file(folder / "model.safetensors")
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    model = load_model(Settings(model=str(folder), device="cpu"))
    info, results = _served(model)
    assert (info["format"], info["head"]) == ("trl-value-head", "v_head.summary")
    reference = _backbone_reference(
        folder,
        weights["v_head.summary.weight"],
        weights["v_head.summary.bias"],
        causal_lm=True,
    )
    _assert_matches(results, reference)


def test_a_value_head_in_pytorch_bin_files_is_found(tmp_path: Path) -> None:
    """Older savers write ``pytorch_model.bin``; trainers leave other pickles beside it
    (``training_args.bin``), which are not weights and are skipped."""
    folder = save_trl_value_head_model(tmp_path / "safetensors", seed=8)
    expected = load_reward_model(folder, device="cpu").score([[5, 6, 7, 8, 9]])[0]
    old = tmp_path / "bin"
    old.mkdir()
    for name in ("config.json", "generation_config.json"):
        (old / name).write_bytes((folder / name).read_bytes())
    torch.save(dict(load_file(folder / "model.safetensors")), old / "pytorch_model.bin")
    torch.save({"learning_rate": 1e-5, "note": "not weights"}, old / "training_args.bin")
    model = load_reward_model(old, device="cpu")
    assert model.spec.format == "trl-value-head"
    assert torch.allclose(model.score([[5, 6, 7, 8, 9]])[0], expected, atol=1e-6)


@pytest.fixture(scope="module")
def three_objectives(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("rm-three")
    save_tiny_reward_model(folder, "llama", seed=5, num_labels=3)
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {"0": "helpful", "1": "harmless", "2": "honest"}
    config["label2id"] = {"helpful": 0, "harmless": 1, "honest": 2}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_multi_objective_head_is_refused_without_a_choice(three_objectives: Path) -> None:
    with pytest.raises(ModelLoadError) as refused:
        load_reward_model(three_objectives, device="cpu")
    message = str(refused.value)
    assert "num_labels=3" in message
    assert "0=helpful, 1=harmless, 2=honest" in message
    assert "--objective K" in message
    assert "--objective-weights" in message


@pytest.mark.parametrize(
    ("choice", "mix", "described"),
    [
        ({"objective": 2}, [0.0, 0.0, 1.0], "column 2 (honest)"),
        ({"objective_weights": [0.5, -1.0, 2.0]}, [0.5, -1.0, 2.0], "weights 0.5,-1,2"),
    ],
)
def test_the_chosen_objective_is_redistributed(
    three_objectives: Path, choice: dict[str, Any], mix: list[float], described: str
) -> None:
    model = load_model(Settings(model=str(three_objectives), device="cpu", **choice))
    info, results = _served(model)
    assert info["objective"] == described
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(three_objectives).eval()
    weights = torch.tensor(mix, dtype=torch.float64)

    def reference(sequence: Sequence[int]) -> list[float]:
        with torch.inference_mode():
            return [
                float(hf(input_ids=torch.tensor([list(sequence[:k])])).logits[0].double() @ weights)
                for k in range(1, len(sequence) + 1)
            ]

    _assert_matches(results, reference)


def test_objective_choices_that_do_not_fit_are_refused(three_objectives: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"--objective 3 is out of range.*0\.\.2"):
        load_reward_model(three_objectives, device="cpu", objective=3)
    with pytest.raises(ModelLoadError, match=r"has 2 weight.*3 outputs"):
        load_reward_model(three_objectives, device="cpu", objective_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="not both"):
        Settings(objective=1, objective_weights=[1.0, 0.0, 0.0])


def test_format_settings_come_from_flags_and_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tokenreward_service.cli import build_parser

    monkeypatch.setenv("TOKENREWARD_OBJECTIVE_WEIGHTS", "0.5, -1, 2")
    monkeypatch.setenv("TOKENREWARD_NORMALIZE_REWARD", "true")
    settings = Settings()
    assert settings.objective_weights == [0.5, -1.0, 2.0]
    assert settings.normalize_reward is True
    args = [
        "serve",
        "--trust-remote-code",
        "--adapter",
        "pkg.mod:fn",
        "--normalize-reward",
        "false",
    ]
    flags = {k: v for k, v in vars(build_parser().parse_args(args)).items() if k != "command"}
    settings = Settings(**flags)
    assert (settings.trust_remote_code, settings.adapter) == (True, "pkg.mod:fn")
    assert settings.normalize_reward is False
    monkeypatch.delenv("TOKENREWARD_TRUST_REMOTE_CODE", raising=False)
    assert Settings().trust_remote_code is False  # off unless asked for


def test_a_causal_lm_without_a_head_is_refused_with_what_was_looked_for(tmp_path: Path) -> None:
    folder = save_causal_lm(tmp_path)
    with pytest.raises(ModelLoadError) as refused:
        load_reward_model(folder, device="cpu")
    message = str(refused.value)
    assert message.startswith("LlamaForCausalLM is a causal language model without a reward head")
    for looked_for in ("*ForSequenceClassification", "value_head_prefix", "v_head.summary.weight"):
        assert looked_for in message
    assert "Found weights under: lm_head.weight, model.*" in message
    assert "--adapter MODULE:FUNCTION" in message


def test_an_encoder_without_a_head_is_refused_as_an_encoder(tmp_path: Path) -> None:
    from transformers import BertModel

    BertModel(tiny_config("bert")).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"BertModel is not causal.*decoder-only"):
        load_reward_model(tmp_path, device="cpu")


def test_an_openrlhf_head_that_is_not_where_the_config_says_is_refused(tmp_path: Path) -> None:
    folder = save_openrlhf_reward_model(tmp_path, value_head_prefix="value_head")
    config = json.loads((folder / "config.json").read_text())
    config["value_head_prefix"] = "reward_head"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as refused:
        load_reward_model(folder, device="cpu")
    assert "value_head_prefix='reward_head'" in str(refused.value)
    assert "no 'reward_head.weight'" in str(refused.value)
    assert "Found weights under: model.*, value_head.weight" in str(refused.value)


def test_an_openrlhf_critic_is_not_a_reward_model(tmp_path: Path) -> None:
    folder = save_openrlhf_reward_model(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["CriticModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="OpenRLHF critic"):
        load_reward_model(folder, device="cpu")


def test_a_sequence_classifier_whose_head_is_missing_from_the_weights_is_refused(
    tmp_path: Path,
) -> None:
    """transformers would initialise the missing head at random and only warn."""
    from safetensors.torch import save_file

    folder = save_tiny_reward_model(tmp_path, "llama")
    weights = load_file(folder / "model.safetensors")
    del weights["score.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"lack 'score.weight'.*would be random"):
        load_reward_model(folder, device="cpu")


def test_sequence_classification_still_matches_the_reference(
    model_dir: Any, llama: RewardModel
) -> None:
    """The loader's new paths leave the old one as it was: format, head and reference."""
    _, results = _served(llama)
    assert llama.spec.format == "sequence-classification"
    assert (llama.spec.head, llama.spec.objective, llama.spec.normalization) == (
        "score",
        None,
        None,
    )
    _assert_matches(results, lambda seq: reference_prefix_scores(model_dir("llama", seed=7), seq))
