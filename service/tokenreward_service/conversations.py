"""Every item form to one RM token sequence: IDs, text, chat messages, the policy's tokens.

Between the wire and the model. An item comes as RM token IDs, as text, as a conversation to
render with the RM's chat template, or as token IDs of a policy tokenizer; it leaves as one
:class:`Prepared` sequence ``prompt | response | suffix`` in the RM's vocabulary, plus, where
the caller's tokens are not the RM's response tokens, the sequence position each caller token
reads its prefix score at (:func:`tokenreward_service.alignment.read_positions`). Errors are
domain errors naming the item.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenreward.protocol import Message, RewardItem, RewardRequest
from tokenreward_service.alignment import char_spans, read_positions, separator_cuts, step_ends
from tokenreward_service.errors import InvalidRequest, ModelLoadError
from tokenreward_service.tokentext import Decoded, TokenText

__all__ = ["Prepared", "Preparer", "load_policy_tokenizers", "load_tokenizer"]

_MARKER = "TOKENREWARDRESPONSE7F3A9C"
"""Rendered in place of the response to find where the template puts it."""


@dataclass(frozen=True)
class Prepared:
    """An item as the RM reads it, and how its rewards map back to the caller's tokens."""

    sequence: list[int]
    """``prompt | response | suffix`` in the RM's vocabulary."""
    prompt_len: int
    response_len: int
    """Number of rewards returned: the caller's response tokens."""
    read_positions: list[int] | None = None
    """Per caller token, the position read for its prefix score (-1: none yet, the baseline);
    ``None``: the caller's tokens are the RM tokens at ``prompt_len, prompt_len + 1, ...``."""
    response_tokens: list[str] | None = None
    response_offsets: list[tuple[int, int]] | None = None
    step_ends: list[int] | None = None


@dataclass(frozen=True)
class _Rendered:
    """The conversation with the response as its last assistant turn: ``before + middle +
    after``; ``middle`` is what the template made of the response, found at ``offset``
    (characters) in the response as given (a template may trim it)."""

    before: str
    middle: str
    after: str
    offset: int


@dataclass(frozen=True)
class _Conversation:
    """A rendered conversation as RM tokens: ``ids[:prompt_len]`` come before the response,
    the next ``count`` are the response's, the rest are the template's suffix. ``ends`` are
    each token's byte end, counted from the start of the response text as given."""

    ids: list[int]
    ends: list[int]
    prompt_len: int
    count: int


def load_tokenizer(path: str | Path) -> Any:
    """A Hugging Face tokenizer from a local folder (no hub)."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"tokenizer folder {folder} does not exist")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {folder}: {exc}") from exc


def load_policy_tokenizers(specs: Sequence[str]) -> dict[str, TokenText]:
    """``NAME=PATH`` specs to named :class:`TokenText` objects."""
    out: dict[str, TokenText] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path.strip():
            raise ModelLoadError(f"policy tokenizer {spec!r} is not NAME=PATH")
        if name in out:
            raise ModelLoadError(f"policy tokenizer name {name!r} is given twice")
        out[name] = TokenText(load_tokenizer(path.strip()), name)
    return out


class Preparer:
    """Turns a request's items into :class:`Prepared` sequences for one loaded RM."""

    def __init__(
        self,
        *,
        vocab_size: int,
        suffix_ids: tuple[int, ...],
        rm: TokenText | None = None,
        chat_template: str | None = None,
        policies: dict[str, TokenText] | None = None,
    ) -> None:
        self.vocab_size = vocab_size
        self.suffix_ids = suffix_ids
        self.rm = rm
        self.chat_template = chat_template
        if chat_template is None and rm is not None:
            self.chat_template = getattr(rm.tokenizer, "chat_template", None) or None
        self.policies = policies or {}

    def prepare(self, request: RewardRequest) -> list[Prepared]:
        """Every item of the request, in order; the first bad item raises, naming it."""
        policy: TokenText | None = None
        if request.policy_tokenizer is not None:
            policy = self.policies.get(request.policy_tokenizer)
            if policy is None:
                known = ", ".join(sorted(self.policies)) or "none are loaded"
                raise InvalidRequest(
                    f"policy_tokenizer {request.policy_tokenizer!r} is not loaded ({known}); "
                    "start the server with --policy-tokenizer NAME=PATH"
                )
        out = []
        for index, item in enumerate(request.items):
            prepared = self._item(item, index, policy, request.step_separator)
            out.append(prepared)
        return out

    # -- the forms ---------------------------------------------------------------------------

    def _item(
        self, item: RewardItem, index: int, policy: TokenText | None, separator: str | None
    ) -> Prepared:
        if item.response_ids is not None and policy is not None:
            return self._policy_item(item, index, policy, separator)
        if item.response_ids is not None:
            return self._rm_ids_item(item, index, separator)
        return self._text_item(item, index, separator)

    def _rm_ids_item(self, item: RewardItem, index: int, separator: str | None) -> Prepared:
        assert item.response_ids is not None
        response = item.response_ids
        self._check_vocab("response_ids", response, self.vocab_size, index)
        if item.messages is not None:
            rendered = self._render(item.messages, _MARKER, index)
            rm = self._require_rm(index)
            prompt = rm.encode(rendered.before)[0]
            after = rm.encode(rendered.after)[0]
            sequence = [*prompt, *response, *_without_overlap(response, after)]
            sequence += self._suffix_after(sequence)
        else:
            assert item.prompt_ids is not None
            prompt = item.prompt_ids
            self._check_vocab("prompt_ids", prompt, self.vocab_size, index)
            sequence = [*prompt, *response, *self._suffix_after(response)]
        steps = None
        if separator is not None:
            decoded = self._require_rm(index, "step_separator").decode(response)
            steps = _steps(decoded, separator)
        return Prepared(sequence, len(prompt), len(response), step_ends=steps)

    def _text_item(self, item: RewardItem, index: int, separator: str | None) -> Prepared:
        assert item.response is not None
        rm = self._require_rm(index)
        response = item.response
        if item.messages is not None:
            conversation = self._conversation(rm, item.messages, response, index)
            prompt_len, count = conversation.prompt_len, conversation.count
            if count == 0:
                raise InvalidRequest(
                    "the response text gives no tokens in the chat template", item=index
                )
            byte_spans = _spans_from_ends(conversation.ends, prompt_len, count)
            sequence = conversation.ids + self._suffix_after(conversation.ids)
        else:
            assert item.prompt is not None
            prompt = rm.encode(item.prompt, special=True)[0]
            response_ids, offsets = rm.encode(response)
            if not response_ids:
                raise InvalidRequest("the response text tokenizes to no tokens", item=index)
            ends = rm.byte_ends(response, response_ids, offsets)
            prompt_len, count = len(prompt), len(response_ids)
            byte_spans = _spans_from_ends(ends, 0, count)
            sequence = [*prompt, *response_ids, *self._suffix_after(response_ids)]
        chars = char_spans(response, byte_spans)
        steps = None if separator is None else _steps(Decoded(response, byte_spans), separator)
        return Prepared(
            sequence,
            prompt_len,
            count,
            response_tokens=[response[a:b] for a, b in chars],
            response_offsets=chars,
            step_ends=steps,
        )

    def _policy_item(
        self, item: RewardItem, index: int, policy: TokenText, separator: str | None
    ) -> Prepared:
        assert item.response_ids is not None
        rm = self._require_rm(index, "policy_tokenizer")
        self._check_vocab("response_ids", item.response_ids, policy.vocab_size, index, policy)
        decoded = policy.decode(item.response_ids)
        text = decoded.text
        if item.messages is not None:
            conversation = self._conversation(rm, item.messages, text, index)
            prompt_len, count = conversation.prompt_len, conversation.count
            rm_ends = conversation.ends[prompt_len : prompt_len + count]
            sequence = conversation.ids + self._suffix_after(conversation.ids)
        else:
            assert item.prompt_ids is not None
            self._check_vocab("prompt_ids", item.prompt_ids, policy.vocab_size, index, policy)
            prompt_text = policy.tokenizer.decode(
                item.prompt_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            prompt = rm.encode(str(prompt_text), special=True)[0]
            response_ids, offsets = rm.encode(text)
            rm_ends = rm.byte_ends(text, response_ids, offsets)
            prompt_len = len(prompt)
            sequence = [*prompt, *response_ids, *self._suffix_after(response_ids)]
        positions = read_positions(rm_ends, [end for _, end in decoded.spans], prompt_len)
        chars = char_spans(text, decoded.spans)
        return Prepared(
            sequence,
            prompt_len,
            len(item.response_ids),
            read_positions=positions,
            response_tokens=[text[a:b] for a, b in chars],
            response_offsets=chars,
            step_ends=None if separator is None else _steps(decoded, separator),
        )

    # -- helpers -----------------------------------------------------------------------------

    def _require_rm(self, index: int, feature: str = "text") -> TokenText:
        if self.rm is None:
            raise InvalidRequest(
                f"this model has no tokenizer, so {feature} items cannot be scored; send "
                "prompt_ids and response_ids of the RM's vocabulary",
                item=index,
            )
        return self.rm

    def _suffix_after(self, ids: Sequence[int]) -> list[int]:
        """The configured suffix, unless ``ids`` already end with it (the policy generated the
        EOS, or the chat template wrote it), so it is never read twice."""
        suffix = self.suffix_ids
        if suffix and tuple(ids[-len(suffix) :]) == suffix:
            return []
        return list(suffix)

    @staticmethod
    def _check_vocab(
        name: str, ids: Sequence[int], vocab: int, index: int, policy: TokenText | None = None
    ) -> None:
        if ids and (min(ids) < 0 or max(ids) >= vocab):
            bad = next(t for t in ids if not 0 <= t < vocab)
            whose = f"the policy tokenizer {policy.name!r}'s" if policy else "the"
            raise InvalidRequest(
                f"{name} holds token id {bad}, outside {whose} vocabulary [0, {vocab})",
                item=index,
            )

    def _conversation(
        self, rm: TokenText, messages: Sequence[Message], response: str, index: int
    ) -> _Conversation:
        """The conversation rendered with ``response`` as its last turn, tokenized as one text
        (as the RM reads it), and which of its tokens are the response's: those that end
        inside the response's bytes. Token ends are given in bytes of ``response``."""
        rendered = self._render(messages, response, index)
        full = rendered.before + rendered.middle + rendered.after
        ids, offsets = rm.encode(full)
        ends = rm.byte_ends(full, ids, offsets)
        start = len(rendered.before.encode())
        stop = start + len(rendered.middle.encode())
        shift = len(response[: rendered.offset].encode()) - start
        return _Conversation(
            ids=ids,
            ends=[e + shift for e in ends],
            prompt_len=sum(1 for e in ends if e <= start),
            count=sum(1 for e in ends if start < e <= stop),
        )

    def _render(self, messages: Sequence[Message], response: str, index: int) -> _Rendered:
        """Render the conversation with ``response`` as the last assistant turn and find it.

        The template writes any BOS itself and the text is tokenized without adding special
        tokens (as transformers' ``apply_chat_template`` does), so BOS is never doubled.
        """
        rm = self._require_rm(index, "messages")
        if self.chat_template is None:
            raise InvalidRequest(
                "this model's tokenizer has no chat template, so messages cannot be rendered; "
                "start the server with --chat-template FILE, or send prompt text",
                item=index,
            )
        marked = self._apply(rm, messages, _MARKER, index)
        if marked.count(_MARKER) != 1:
            raise InvalidRequest(
                "the chat template does not write the response exactly once", item=index
            )
        before, _, after = marked.partition(_MARKER)
        if response == _MARKER:
            return _Rendered(before, response, after, 0)
        full = self._apply(rm, messages, response, index)
        middle = full[len(before) : len(full) - len(after)]
        offset = response.find(middle) if middle else 0
        consistent = full.startswith(before) and full.endswith(after)
        if not consistent or len(full) < len(before) + len(after) or offset < 0:
            raise InvalidRequest(
                "the chat template changes the response beyond trimming it, so its tokens cannot "
                "be located in the rendered conversation",
                item=index,
            )
        return _Rendered(before, middle, after, offset)

    def _apply(self, rm: TokenText, messages: Sequence[Message], response: str, index: int) -> str:
        conversation = [m.model_dump() for m in messages]
        conversation.append({"role": "assistant", "content": response})
        try:
            text = rm.tokenizer.apply_chat_template(
                conversation, chat_template=self.chat_template, tokenize=False
            )
        except Exception as exc:  # a template's own raise_exception, or a Jinja error
            raise InvalidRequest(
                f"the chat template failed to render the conversation: {exc}", item=index
            ) from None
        return str(text)


def _without_overlap(response: Sequence[int], after: Sequence[int]) -> list[int]:
    """``after`` less the tokens the response already ends with (e.g. a generated end of turn)."""
    for k in range(min(len(response), len(after)), 0, -1):
        if list(response[-k:]) == list(after[:k]):
            return list(after[k:])
    return list(after)


def _spans_from_ends(ends: Sequence[int], first: int, count: int) -> list[tuple[int, int]]:
    """Byte spans of tokens ``first .. first + count - 1`` from all tokens' ends, clipped at 0."""
    spans = []
    previous = max(0, ends[first - 1]) if first > 0 else 0
    for end in ends[first : first + count]:
        end = max(0, end)
        spans.append((min(previous, end), end))
        previous = end
    return spans


def _steps(decoded: Decoded, separator: str) -> list[int]:
    return step_ends(decoded.spans, separator_cuts(decoded.text.encode(), separator.encode()))
