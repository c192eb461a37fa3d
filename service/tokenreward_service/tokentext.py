"""Tokens as bytes: decode token IDs with each token's byte span, find token ends in a text.

Rewards are moved between tokenizers in byte space (:mod:`tokenreward_service.alignment`), so
both sides need exact byte spans. Two tokenizer families give them directly from the vocabulary:
byte-level BPE (GPT-2, Llama 3, Qwen, DeepSeek: every token is a string of bytes in the GPT-2
alphabet) and SentencePiece-style vocabularies (``▁`` for a space, ``<0xNN>`` byte fallback).
Anything else, or a decoding that does not reproduce the tokenizer's own ``decode``, falls back
to decoding prefixes, which is exact at character boundaries and never credits a token early.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Decoded", "TokenText"]

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_PROBE = (
    " Hello, world!  It's 3.14 -- ok?\n\n\tcafe\u0301 \u00e9t\u00e9 😀👩\u200d👧 你好 <b> don't "
)


def _byte_level_alphabet() -> dict[str, int]:
    """The GPT-2 byte-level alphabet, character -> byte: printable bytes stand for themselves,
    the others are shifted past 255 so that every byte has a visible character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    char_of = {b: b for b in printable}
    shifted = 0
    for byte in range(256):
        if byte not in char_of:
            char_of[byte] = 256 + shifted
            shifted += 1
    return {chr(c): b for b, c in char_of.items()}


_BYTE_LEVEL = _byte_level_alphabet()


@dataclass(frozen=True)
class Decoded:
    """Token IDs as text: ``spans[i]`` is token ``i``'s ``[start, end)`` in ``text.encode()``."""

    text: str
    spans: list[tuple[int, int]]


def _decoder_kind(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return "other"
    try:
        spec = json.loads(decoder.__getstate__())
    except (AttributeError, TypeError, ValueError):
        return "other"
    kinds = [d.get("type") for d in spec.get("decoders", [spec])]
    if kinds == ["ByteLevel"]:
        return "byte_level"
    if "Metaspace" in kinds or any(
        d.get("type") == "Replace" and d.get("pattern", {}).get("String") == "▁"
        for d in spec.get("decoders", [])
    ):
        return "metaspace"
    return "other"


class TokenText:
    """One tokenizer's vocabulary as bytes, built once when the tokenizer is loaded."""

    def __init__(self, tokenizer: Any, name: str = "") -> None:
        self.tokenizer = tokenizer
        self.name = name
        self.vocab_size = len(tokenizer)
        self.kind = _decoder_kind(tokenizer)
        added = dict(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        special_ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
        tokens = tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))
        self._pieces: list[bytes | None] = []
        self._special: list[bool] = []
        for token_id, token in enumerate(tokens):
            entry = added.get(token_id)
            if entry is not None:
                self._pieces.append(str(entry.content).encode())
                self._special.append(bool(entry.special) or token_id in special_ids)
            else:
                self._pieces.append(None if token is None else self._piece(token))
                self._special.append(token_id in special_ids)
        self._exact = self.kind != "other" and self._pieces_spell_decodings()

    def _pieces_spell_decodings(self) -> bool:
        """Whether the tokens' bytes in order spell what the tokenizer's own ``decode`` gives
        (up to the leading space a SentencePiece decoder strips), checked once on a probe text
        rich in what tokenizers treat specially; if not, every decoding goes by prefixes."""
        ids = self.encode(_PROBE)[0]
        pieces = [b"" if self._special[i] else self._pieces[i] for i in ids]
        if any(p is None for p in pieces):
            return False
        text = b"".join(p for p in pieces if p is not None).decode("utf-8", errors="replace")
        reference = str(
            self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        )
        return text == reference or (text.startswith(" ") and text[1:] == reference)

    def _piece(self, token: str) -> bytes | None:
        if self.kind == "byte_level":
            try:
                return bytes(_BYTE_LEVEL[c] for c in token)
            except KeyError:
                return None
        if self.kind == "metaspace":
            match = _BYTE_TOKEN.match(token)
            if match:
                return bytes([int(match.group(1), 16)])
            return token.replace("▁", " ").encode()
        return None

    def encode(
        self, text: str, *, special: bool = False
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Token IDs of ``text`` and their character offsets; straight from the Rust tokenizer
        where there is one (transformers' own wrapper costs more than the tokenization); with
        special tokens through transformers, which decides how they are added."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and not special:
            encoding = backend.encode(text, add_special_tokens=special)
            return list(encoding.ids), list(encoding.offsets)
        encoded = self.tokenizer(
            text, add_special_tokens=special, return_offsets_mapping=not special
        )
        offsets = encoded.get("offset_mapping") or [(0, 0)] * len(encoded["input_ids"])
        return list(encoded["input_ids"]), [(int(a), int(b)) for a, b in offsets]

    def decode(self, ids: Sequence[int]) -> Decoded:
        """The text of ``ids`` as the RM should read it, with each token's byte span; special
        tokens (EOS, end of turn) contribute no text and get an empty span.

        The text is the tokens' bytes in order, in context: a SentencePiece response that starts
        with ``▁`` keeps its leading space, as it follows the prompt. Bytes that are not valid
        UTF-8 (a generation cut inside a character) become U+FFFD, and a token that ends inside
        a character then ends at the character's start.
        """
        pieces = [b"" if self._special[i] else self._pieces[i] for i in ids]
        if not self._exact or any(p is None for p in pieces):
            return self._decode_by_prefixes(ids)
        raw = b"".join(p for p in pieces if p is not None)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return self._decode_incrementally([p for p in pieces if p is not None])
        spans = []
        position = 0
        for piece in pieces:
            assert piece is not None
            spans.append((position, position + len(piece)))
            position += len(piece)
        return Decoded(text, spans)

    @staticmethod
    def _decode_incrementally(pieces: Sequence[bytes]) -> Decoded:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        parts: list[str] = []
        spans = []
        position = 0
        for index, piece in enumerate(pieces):
            out = decoder.decode(piece, final=index == len(pieces) - 1)
            parts.append(out)
            size = len(out.encode())
            spans.append((position, position + size))
            position += size
        return Decoded("".join(parts), spans)

    def _decode_by_prefixes(self, ids: Sequence[int]) -> Decoded:
        """Any tokenizer: decode each prefix, and end a token where the text stops agreeing
        with the full decoding (quadratic; only for tokenizers of neither known family)."""

        def decode(part: Sequence[int]) -> bytes:
            text = self.tokenizer.decode(
                list(part), skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            return str(text).encode()

        full = decode(ids)
        spans = []
        previous = 0
        for k in range(1, len(ids) + 1):
            prefix = decode(ids[:k]) if k < len(ids) else full
            common = 0
            limit = min(len(prefix), len(full))
            while common < limit and prefix[common] == full[common]:
                common += 1
            end = max(previous, common)
            spans.append((previous, end))
            previous = end
        return Decoded(full.decode("utf-8", errors="replace"), spans)

    def byte_ends(
        self, text: str, ids: Sequence[int], offsets: Sequence[tuple[int, int]]
    ) -> list[int]:
        """Byte end of each of ``ids`` (this tokenizer's encoding of ``text``) in
        ``text.encode()``: from the tokens' bytes where they spell the text (exact inside
        multi-byte characters), else from the character offsets the tokenizer reported."""
        target = text.encode()
        pieces = [self._pieces[i] for i in ids]
        if all(p is not None for p in pieces):
            raw = b"".join(p for p in pieces if p is not None)
            shift = 0 if raw == target else 1 if raw == b" " + target else None
            if shift is not None:
                ends = []
                position = -shift
                for piece in pieces:
                    assert piece is not None
                    position += len(piece)
                    ends.append(max(0, position))
                return ends
        byte_of_char = [0]
        for char in text:
            byte_of_char.append(byte_of_char[-1] + len(char.encode()))
        ends = []
        last = 0
        for _, end in offsets:
            last = max(last, byte_of_char[min(end, len(text))])
            ends.append(last)
        return ends
