"""Tokenisation with the loss mask: a corpus :class:`Record` -> token ids and labels.

The gradient of a record is the gradient of the causal-LM loss on the tokens a model is trained
to produce, so every record is rendered to one text, together with the character spans the loss
covers, tokenised once, and each token whose characters overlap a loss span keeps its id as a
label; every other token gets the label ``-100`` (ignored by Hugging Face's loss).

Chat format of ``messages`` records
-----------------------------------
``template="auto"`` (the default) uses the tokenizer's own ``chat_template`` when it has one and
the built-in ``gradstore-default`` format otherwise; ``"default"`` and ``"tokenizer"`` force one.

``gradstore-default`` is the LESS / tulu format. The text is the tokenizer's BOS token (when it
has one) followed, for each message, by::

    <|system|>\\n{content}\\n
    <|user|>\\n{content}\\n
    <|assistant|>\\n{content}{eos_token}\\n

The loss covers each assistant ``{content}{eos_token}``, nothing else.

With the tokenizer's template the text is ``apply_chat_template(messages, tokenize=False)``, and
the loss span of assistant message ``i`` runs from the end of the rendering of ``messages[:i]``
with ``add_generation_prompt=True`` to the end of the rendering of ``messages[:i + 1]``. This
needs a prefix-stable template (rendering fewer messages gives a prefix of the full text);
:class:`ModelError` says so when it is not. No BOS is added: templates write their own.

Other shapes
------------
* ``prompt_completion``: ``{bos}{prompt}{completion}{eos_token}``, loss on completion and EOS;
* ``text``: ``{bos}{text}{eos_token}``, loss on every token.

Texts are tokenised with ``add_special_tokens=False`` (BOS and EOS are already written in the
text, and fast tokenizers recognise special tokens written in text), then cut from the right to
``max_length`` tokens. A record with no loss token left after the cut raises
:class:`BadRecordError`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .corpus import Record
from .errors import BadRecordError, ModelError

DEFAULT_TEMPLATE_NAME = "gradstore-default"
TOKENIZER_TEMPLATE_NAME = "tokenizer"
TEMPLATE_CHOICES = ("auto", "default", "tokenizer")
IGNORE_INDEX = -100  # label value Hugging Face's cross-entropy ignores


@dataclass(frozen=True)
class Encoded:
    """Token ids and labels of one record."""

    input_ids: np.ndarray  # int32, 1-D
    labels: np.ndarray  # int32, 1-D, same length; IGNORE_INDEX where there is no loss
    truncated: bool  # the full text had more than max_length tokens

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_label_tokens(self) -> int:
        """Tokens that contribute to the loss.

        Hugging Face models shift labels by one (position ``t`` predicts label ``t + 1``), so the
        label at position 0 is never predicted and is not counted.
        """
        return int(np.count_nonzero(self.labels[1:] != IGNORE_INDEX))


@dataclass(frozen=True)
class _Rendered:
    """A record's text and the character spans ``[start, end)`` the loss covers."""

    text: str
    loss_spans: list[tuple[int, int]] = field(default_factory=list)
    loss_on_all_tokens: bool = False


class Formatter:
    """Encodes records for one tokenizer, chat format and maximum length."""

    def __init__(self, tokenizer: Any, max_length: int, template: str = "auto"):
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length={max_length!r}: expected a positive integer")
        if template not in TEMPLATE_CHOICES:
            raise ValueError(f"template={template!r}: expected one of {', '.join(TEMPLATE_CHOICES)}")
        _check_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.template_name = _resolve_template(tokenizer, template)

    # ---------------------------------------------------------------------------------------
    # Public

    def encode(self, record: Record) -> Encoded:
        """Token ids and labels of ``record``, cut to ``max_length`` tokens."""
        rendered = self._render(record)
        input_ids, offsets = self._tokenize(rendered.text)
        if rendered.loss_on_all_tokens:
            labels = input_ids.copy()
        else:
            labels = _labels_from_spans(input_ids, offsets, rendered.loss_spans)
        truncated = input_ids.shape[0] > self.max_length
        encoded = Encoded(input_ids[: self.max_length], labels[: self.max_length], truncated)
        if encoded.num_label_tokens == 0:
            raise BadRecordError(record.location, self._nothing_to_train_on(labels, truncated))
        return encoded

    def prompt_text(self, record: Record) -> str:
        """The text a model is given to produce the record's last answer.

        It is the record's own rendering (the one :meth:`encode` trains on) up to where the loss
        span of its last assistant message (or its completion) begins: for a chat record, every
        message before the last answer followed by the assistant header (``<|assistant|>\\n`` in
        the default format, the generation prompt with a tokenizer template); for a
        ``prompt_completion`` record, BOS and the prompt. Training and generation therefore see
        the same format. A ``text`` record, or a chat record without an assistant message, has no
        prompt and raises :class:`BadRecordError`.
        """
        rendered = self._render(record)
        if rendered.loss_on_all_tokens or not rendered.loss_spans:
            raise BadRecordError(record.location, "the record has no answer to generate (a text record, or "
                                                  "no assistant message), so it has no prompt")
        return rendered.text[: rendered.loss_spans[-1][0]]

    def describe(self) -> dict:
        """JSON-able description of the encoding, for the datastore manifest."""
        tokenizer = self.tokenizer
        description = {
            "template": self.template_name,
            "max_length": self.max_length,
            "tokenizer_class": type(tokenizer).__name__,
        }
        for name in ("bos", "eos", "pad"):
            description[f"{name}_token"] = getattr(tokenizer, f"{name}_token", None)
            description[f"{name}_token_id"] = getattr(tokenizer, f"{name}_token_id", None)
        if self.template_name == TOKENIZER_TEMPLATE_NAME:
            # The template text itself can be long; its hash is enough to tell two apart.
            template_text = json.dumps(tokenizer.chat_template, sort_keys=True)
            description["chat_template_sha256"] = hashlib.sha256(template_text.encode()).hexdigest()
        return description

    # ---------------------------------------------------------------------------------------
    # Rendering

    def _render(self, record: Record) -> _Rendered:
        if record.shape == "messages":
            messages = [{"role": m["role"], "content": m["content"]} for m in record.record["messages"]]
            if self.template_name == TOKENIZER_TEMPLATE_NAME:
                return self._render_with_tokenizer_template(messages, record.location)
            return self._render_default(messages)
        if record.shape == "prompt_completion":
            return self._render_prompt_completion(record.record["prompt"], record.record["completion"])
        if record.shape == "text":
            return _Rendered(self._bos() + record.record["text"] + self.tokenizer.eos_token,
                             loss_on_all_tokens=True)
        raise BadRecordError(record.location, f"unknown record shape {record.shape!r}")

    def _render_default(self, messages: list[dict]) -> _Rendered:
        eos = self.tokenizer.eos_token
        parts, spans, length = [self._bos()], [], len(self._bos())
        for message in messages:
            header = f"<|{message['role']}|>\n"
            if message["role"] == "assistant":
                body = message["content"] + eos
                spans.append((length + len(header), length + len(header) + len(body)))
            else:
                body = message["content"]
            piece = header + body + "\n"
            parts.append(piece)
            length += len(piece)
        return _Rendered("".join(parts), spans)

    def _render_prompt_completion(self, prompt: str, completion: str) -> _Rendered:
        head = self._bos() + prompt
        text = head + completion + self.tokenizer.eos_token
        return _Rendered(text, [(len(head), len(text))])

    def _render_with_tokenizer_template(self, messages: list[dict], location: str) -> _Rendered:
        full = self._apply_template(messages, False, location)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] == "assistant":
                spans.append(self._assistant_span(messages, index, full, location))
        return _Rendered(full, spans)

    def _assistant_span(self, messages: list[dict], index: int, full: str,
                        location: str) -> tuple[int, int]:
        through = self._apply_template(messages[: index + 1], False, location)
        self._check_prefix(through, full, f"messages[:{index + 1}]", location)
        if index == 0:
            # Templates cannot render an empty conversation, so find the first message's content
            # in its own rendering instead.
            start = through.rfind(messages[0]["content"])
            if start < 0:
                raise ModelError(
                    f"record {location}: the tokenizer's chat template does not write the first "
                    "assistant message's content verbatim, so its loss span cannot be located; "
                    "use template='default'"
                )
            return start, len(through)
        before = self._apply_template(messages[:index], True, location)
        self._check_prefix(before, through, f"messages[:{index}] with a generation prompt", location)
        return len(before), len(through)

    def _apply_template(self, messages: list[dict], add_generation_prompt: bool, location: str) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as error:  # templates raise their own errors for conversations they reject
            raise BadRecordError(
                location, f"the tokenizer's chat template cannot render this conversation: {error}"
            ) from error

    @staticmethod
    def _check_prefix(prefix: str, text: str, what: str, location: str) -> None:
        if not text.startswith(prefix):
            raise ModelError(
                f"record {location}: the tokenizer's chat template is not prefix-stable: the "
                f"rendering of {what} is not a prefix of the longer conversation's, so assistant "
                "spans cannot be located; use template='default'"
            )

    def _bos(self) -> str:
        return self.tokenizer.bos_token or ""

    # ---------------------------------------------------------------------------------------
    # Tokenising

    def _tokenize(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (int32) and their character spans ``(n, 2)`` of the whole text."""
        encoding = self.tokenizer(
            text,
            add_special_tokens=False,
            return_offsets_mapping=True,
            split_special_tokens=False,  # the EOS written in the text must stay one token
            verbose=False,  # no warning for texts longer than model_max_length: cut below
        )
        input_ids = np.asarray(encoding["input_ids"], dtype=np.int32)
        offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        return input_ids, offsets

    def _nothing_to_train_on(self, full_labels: np.ndarray, truncated: bool) -> str:
        loss_positions = np.flatnonzero(full_labels[1:] != IGNORE_INDEX) + 1
        if truncated and loss_positions.size:
            return (
                f"nothing left to train on after truncation to max_length={self.max_length} "
                f"tokens: the record has {full_labels.shape[0]} tokens and its first loss token "
                f"is at position {int(loss_positions[0])}"
            )
        return (
            f"nothing to train on: no token after the first falls in a loss span "
            f"(max_length={self.max_length})"
        )


def _labels_from_spans(input_ids: np.ndarray, offsets: np.ndarray,
                       spans: list[tuple[int, int]]) -> np.ndarray:
    """``input_ids`` where a token's characters overlap a loss span, IGNORE_INDEX elsewhere."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    in_loss = np.zeros(input_ids.shape[0], dtype=bool)
    for span_start, span_end in spans:
        in_loss |= (starts < span_end) & (ends > span_start)
    return np.where(in_loss, input_ids, IGNORE_INDEX).astype(np.int32)


def _check_tokenizer(tokenizer: Any) -> None:
    name = type(tokenizer).__name__
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(
            f"tokenizer {name} is not a fast tokenizer: gradstore needs the character offsets "
            "only fast (tokenizers-backed) tokenizers give; load it with use_fast=True"
        )
    if not getattr(tokenizer, "eos_token", None):
        raise ModelError(
            f"tokenizer {name} has no eos_token: gradstore ends every assistant turn, completion "
            "and text with it; set tokenizer.eos_token"
        )


def _resolve_template(tokenizer: Any, template: str) -> str:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if template == "tokenizer" and not has_template:
        raise ModelError(
            f"template='tokenizer' but tokenizer {type(tokenizer).__name__} has no chat_template; "
            "use template='default' or 'auto'"
        )
    if template == "tokenizer" or (template == "auto" and has_template):
        return TOKENIZER_TEMPLATE_NAME
    return DEFAULT_TEMPLATE_NAME
