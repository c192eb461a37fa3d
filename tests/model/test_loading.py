"""Loading: what is refused and why, revision hashing, device and dtype resolution."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tokenreward_service.errors import ModelLoadError
from tokenreward_service.loading import load_reward_model, resolve_device, resolve_dtype
from tokenreward_service.tiny import save_tiny_reward_model


def test_a_bidirectional_encoder_is_refused_with_a_clear_message(
    model_dir: Callable[..., Path],
) -> None:
    with pytest.raises(
        ModelLoadError, match=r"BertForSequenceClassification is not causal.*bidirectional"
    ):
        load_reward_model(model_dir("bert"), device="cpu")


def test_more_than_one_label_is_refused(tmp_path: Path) -> None:
    save_tiny_reward_model(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b"}
    config["label2id"] = {"a": 0, "b": 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="num_labels=2"):
        load_reward_model(tmp_path, device="cpu")


def test_not_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_reward_model(tmp_path, device="cpu")


def test_max_length_cannot_exceed_the_models_positions(llama_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="exceeds the model's 512 positions"):
        load_reward_model(llama_dir, device="cpu", max_length=513)
    assert load_reward_model(llama_dir, device="cpu", max_length=100).spec.max_length == 100


def test_suffix_from_metadata_file_and_override(llama_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(llama_dir, folder)
    (folder / "tokenreward.json").write_text(json.dumps({"suffix_ids": [2], "id": "demo"}))
    spec = load_reward_model(folder, device="cpu").spec
    assert spec.suffix_ids == (2,)
    assert spec.id == "demo"
    assert load_reward_model(folder, device="cpu", suffix_ids=[]).spec.suffix_ids == ()
    with pytest.raises(ModelLoadError, match="outside the vocabulary"):
        load_reward_model(folder, device="cpu", suffix_ids=[128])


def test_revision_is_a_content_hash(
    model_dir: Callable[..., Path], llama_dir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(llama_dir, copy)
    original = load_reward_model(llama_dir, device="cpu").spec.revision
    assert original.startswith("sha256:")
    assert len(original) == 7 + 64
    assert load_reward_model(copy, device="cpu").spec.revision == original  # where it lives: no
    other = load_reward_model(model_dir("llama", seed=99), device="cpu").spec.revision
    assert other != original  # different weights: yes


def test_device_and_dtype_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            resolve_device("cuda")


def test_bfloat16_weights_keep_a_float32_head(llama_dir: Path) -> None:
    """With bf16 weights the head still runs in float32: scores are float32 and close to the
    float32 model's, and differences are not quantised to bf16's 8-bit mantissa."""
    exact = load_reward_model(llama_dir, device="cpu", dtype="float32")
    half = load_reward_model(llama_dir, device="cpu", dtype="bfloat16")
    assert half.spec.dtype == "bfloat16"
    seq = list(range(3, 60))
    a, b = exact.score([seq])[0], half.score([seq])[0]
    assert b.dtype == torch.float32
    assert torch.allclose(a, b, atol=0.15 * float(a.abs().max()))
    diffs = torch.diff(b)
    bf16_rounded = diffs.to(torch.bfloat16).to(torch.float32)
    assert not torch.equal(diffs, bf16_rounded)


def test_scores_do_not_depend_on_the_rest_of_the_batch(llama: object) -> None:
    from tokenreward_service.model import RewardModel

    assert isinstance(llama, RewardModel)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (1, 7, 50, 23, 64)]
    together = llama.score(seqs)
    for seq, scores in zip(seqs, together, strict=True):
        alone = llama.score([seq])[0]
        assert scores.shape == (len(seq),)
        assert torch.allclose(scores, alone, atol=1e-5)
