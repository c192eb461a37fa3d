from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import hypothesis  # noqa: F401  (imported up front: its pytest plugin otherwise imports it late,
import pytest  # inside a hook, where CPython 3.11.7's parser can fail with "AST constructor

#                recursion depth mismatch")
from tokenreward_service.loading import load_reward_model
from tokenreward_service.model import RewardModel
from tokenreward_service.tiny import save_tiny_reward_model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: a tiny random RM of an architecture, saved once per session with save_pretrained."""
    cache: dict[tuple[object, ...], Path] = {}

    def make(architecture: str = "llama", seed: int = 0, **sizes: object) -> Path:
        key = (architecture, seed, *sorted(sizes.items()))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"rm-{architecture}")
            cache[key] = save_tiny_reward_model(folder, architecture, seed=seed, **sizes)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def llama_dir(model_dir: Callable[..., Path]) -> Path:
    return model_dir("llama", seed=7)


@pytest.fixture(scope="session")
def llama(llama_dir: Path) -> RewardModel:
    """The default test model, loaded through the real path (float32, CPU)."""
    return load_reward_model(llama_dir, device="cpu", dtype="float32")


def save_word_tokenizer(folder: Path) -> None:
    """A real Hugging Face fast tokenizer (byte-level BPE trained on a few sentences), saved
    beside a tiny model; it adds BOS to prompts, as Llama tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["the movie was very good", "the movie was bad", "what a great day", "I hate it"] * 20
    tok.train_from_iterator(text, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(folder)


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama RM with a byte-level tokenizer in its folder (all 256 bytes covered)."""
    folder = tmp_path_factory.mktemp("rm-text")
    save_tiny_reward_model(folder, "llama", seed=7, vocab_size=320)
    save_word_tokenizer(folder)
    return folder
