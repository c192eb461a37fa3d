"""Put RM-token rewards on other tokens: byte spans, crediting, and step sums.

Pure functions on integers and strings: no tokenizer, no torch, nothing of the project. The
callers (:mod:`tokenreward_service.conversations`) turn tokens into byte spans; this module
decides who is credited with what.

The rule. The RM scores the text and gives a prefix score after each of its tokens. A caller's
token (a policy token) covers a byte span of the same text. Each RM token's increment is
credited to the caller's token in whose byte span the RM token **ends**; so the prefix score
after caller token ``i`` is the RM's score after the last RM token that ends at or before the
end of ``i``. Consequences: the rewards of the caller's tokens telescope to the same total; no
caller token is credited with an RM increment that was read after its end; a caller token whose
span ends inside an RM token gets nothing for it (the RM had not read it yet); with identical
tokenizations every token gets its own increment.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

__all__ = [
    "char_spans",
    "read_positions",
    "separator_cuts",
    "step_ends",
    "step_sums",
]


def read_positions(
    rm_ends: Sequence[int], unit_ends: Sequence[int], first_position: int
) -> list[int]:
    """For each caller token, the sequence position whose score is the prefix after it.

    ``rm_ends`` are the byte ends of the RM's response tokens (non-decreasing), which sit at
    sequence positions ``first_position, first_position + 1, ...``; ``unit_ends`` are the byte
    ends of the caller's tokens (non-decreasing). ``-1`` means that no RM token has ended yet:
    the prefix score is still the baseline ``s_0``.
    """
    out = []
    for end in unit_ends:
        read = bisect_right(rm_ends, end)
        out.append(first_position + read - 1 if read else -1)
    return out


def separator_cuts(text: bytes, separator: bytes) -> list[int]:
    """Byte positions at which a step ends: just after each (non-overlapping) separator."""
    if not separator:
        raise ValueError("the step separator is empty")
    cuts = []
    start = text.find(separator)
    while start >= 0:
        cuts.append(start + len(separator))
        start = text.find(separator, start + len(separator))
    return cuts


def step_ends(spans: Sequence[tuple[int, int]], cuts: Sequence[int]) -> list[int]:
    """Index of each step's last token.

    A token belongs to the step that holds its last byte (a separator ends the step it closes);
    a token with no bytes (a special token) belongs to the step of the token before it. Steps
    that no token ends in are merged into the next one, so every step has at least one token.
    """
    steps = []
    step = 0
    for start, end in spans:
        if end > start:
            step = bisect_right(cuts, end - 1)
        steps.append(step)
    return [i for i in range(len(steps)) if i + 1 == len(steps) or steps[i + 1] != steps[i]]


def step_sums(rewards: Sequence[float], ends: Sequence[int]) -> list[float]:
    """Sum of the rewards of each step, steps given by their last token's index."""
    sums = []
    start = 0
    for end in ends:
        sums.append(float(sum(rewards[start : end + 1])))
        start = end + 1
    return sums


def char_spans(text: str, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Byte spans in ``text.encode()`` to ``[start, end)`` character spans of ``text``.

    A span that covers part of a character (byte-level tokens split multi-byte characters)
    covers the whole character, as Hugging Face's offset mappings do; an empty span stays empty.
    """
    if text.isascii():  # one byte per character: the spans are the same
        return [(start, max(start, end)) for start, end in spans]
    raw = text.encode()
    starts = [i for i, byte in enumerate(raw) if byte & 0xC0 != 0x80]  # not a continuation byte
    starts.append(len(raw))

    def char_at(byte: int) -> int:
        return bisect_right(starts, byte) - 1

    out = []
    for start, end in spans:
        first = char_at(start)
        out.append((first, first) if end <= start else (first, char_at(end - 1) + 1))
    return out
