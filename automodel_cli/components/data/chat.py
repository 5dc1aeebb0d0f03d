"""Render chat ``messages`` with a chat template and find the assistant tokens to train on.

Only assistant turns are trained, so we need, for the exact token sequence the template
produces, which tokens came from assistant messages. Two routes:

1. The template marks assistant text with ``{% generation %}`` (the HF convention): ask
   ``apply_chat_template(..., return_assistant_tokens_mask=True)``; the template author decided
   what is trained (typically the content and the end-of-turn token).
2. Any other template: render prefixes. For assistant message ``i`` the text of
   ``messages[:i]`` with the generation prompt ends where the answer starts, and the text of
   ``messages[:i+1]`` ends where the turn (including its end-of-turn marker) ends; both must be
   prefixes of the full rendering. The characters in between are the assistant span, mapped to
   tokens of the *full* rendering via offsets (fast tokenizers), so the trained ids are exactly
   the ids the model sees.
3. Templates that rewrite earlier turns (e.g. dropping reasoning from past answers) are not
   prefix-stable: each message's content is then located verbatim in the full rendering and
   assistant contents (plus a directly following EOS token) are trained. Only when a content
   does not appear verbatim is the conversation refused, asking for generation markers.
"""

from __future__ import annotations

import re
from typing import Any

from automodel_cli.errors import UserError

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def resolve_template(tokenizer, chat_template: str | None) -> str:
    """The template to use: ``chat_template`` (model.chat_template) or the tokenizer's own."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: use the default one
        template = template.get("default") or next(iter(template.values()), None)
    if not template:
        raise UserError(
            "The data has a messages column but the tokenizer has no chat template.",
            "Set model.chat_template to a Jinja template (or a tokenizer that ships one), or "
            "provide prompt/completion columns instead (data.prompt_column, "
            "data.completion_column).",
        )
    return template


class ChatEncoder:
    """Turns one conversation into ``(input_ids, labels)`` with only assistant tokens labelled."""

    def __init__(self, tokenizer, template: str, ignore_index: int = -100):
        self.tokenizer = tokenizer
        self.template = template
        self.ignore_index = ignore_index
        self.is_fast = bool(getattr(tokenizer, "is_fast", False))
        self.use_generation_mask = self.is_fast and bool(GENERATION_TAG.search(template))

    # -- public ----------------------------------------------------------------------------
    def encode(self, messages: Any, row: int | str) -> tuple[list[int], list[int]]:
        messages = normalize_messages(messages, row)
        reject_image_parts(messages, row)
        if self.use_generation_mask:
            return self._encode_with_generation_mask(messages, row)
        return self._tokenize_with_spans(*self.assistant_spans(messages, row))

    def assistant_spans(self, messages: list[dict[str, Any]], row: int | str) -> tuple[str, list[tuple[int, int]]]:
        """The full rendering of ``messages`` (normalised) and the character spans of its assistant
        turns (routes 2 and 3). Also used by multimodal encoding, which counts tokens per prefix."""
        full = self._render(messages, row)
        spans = self._spans_by_prefixes(full, messages, row)
        if spans is None:
            spans = self._spans_by_content(full, messages)
        if spans is None:
            raise UserError(
                f"Chat data {row_label(row)}: the chat template does not render conversations "
                "prefix-stably (rendering the first turns differs from the start of the full "
                "conversation), so the assistant tokens cannot be located.",
                "Set model.chat_template to a template that wraps assistant text in "
                "{% generation %}...{% endgeneration %}, or convert the data to "
                "prompt/completion columns.",
            )
        return full, spans

    # -- route 1 ---------------------------------------------------------------------------
    def _encode_with_generation_mask(self, messages, row):
        out = self._call(
            row, messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = list(out["input_ids"])
        mask = list(out["assistant_masks"])
        labels = [tok if m else self.ignore_index for tok, m in zip(ids, mask)]
        return ids, labels

    # -- route 2 ---------------------------------------------------------------------------
    def _spans_by_prefixes(self, full: str, messages, row) -> list[tuple[int, int]] | None:
        """None when the template is not prefix-stable."""
        spans: list[tuple[int, int]] = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            try:
                before = self._render(messages[:i], row, add_generation_prompt=True) if i else ""
            except UserError:
                before = ""  # some templates cannot render an empty/partial prefix
            upto = self._render(messages[: i + 1], row)
            if not (full.startswith(upto) and upto.startswith(before)):
                return None
            spans.append((len(before), len(upto)))
        return spans

    # -- route 3 ---------------------------------------------------------------------------
    def _spans_by_content(self, full: str, messages) -> list[tuple[int, int]] | None:
        """For templates that rewrite earlier turns (Qwen3 drops past reasoning, for example):
        find every message's content in the full rendering, in order, and train each assistant
        content plus the end-of-sequence token that directly follows it. None when some content
        does not appear verbatim (the template transformed it) or is a list of parts (rendered
        part by part, so not one verbatim string), so its tokens cannot be located."""
        eos = getattr(self.tokenizer, "eos_token", None) or ""
        spans: list[tuple[int, int]] = []
        cursor = 0
        for message in messages:
            content = message.get("content")
            if isinstance(content, list):
                return None
            if not isinstance(content, str) or not content:
                continue
            start = full.find(content, cursor)
            if start < 0:
                return None
            end = start + len(content)
            cursor = end
            if message["role"] != "assistant":
                continue
            gap = len(full[end:]) - len(full[end:].lstrip(" "))
            if eos and full.startswith(eos, end + gap):
                end += gap + len(eos)
            spans.append((start, end))
        return spans

    def _tokenize_with_spans(self, text: str, spans: list[tuple[int, int]]):
        tok = self.tokenizer
        if self.is_fast:
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            labels = [self.ignore_index] * len(ids)
            for j, (start, end) in enumerate(enc["offset_mapping"]):
                if end > start and any(s <= start < e for s, e in spans):
                    labels[j] = ids[j]
            return ids, labels
        # Slow tokenizers have no offsets: tokenize the pieces between span borders separately.
        ids, labels = [], []
        cursor = 0
        for start, end in spans:
            for piece, trained in ((text[cursor:start], False), (text[start:end], True)):
                if piece:
                    piece_ids = tok(piece, add_special_tokens=False)["input_ids"]
                    ids += piece_ids
                    labels += piece_ids if trained else [self.ignore_index] * len(piece_ids)
            cursor = end
        if cursor < len(text):
            tail = tok(text[cursor:], add_special_tokens=False)["input_ids"]
            ids += tail
            labels += [self.ignore_index] * len(tail)
        return ids, labels

    def render(self, messages: list[dict[str, Any]], row: int | str, add_generation_prompt: bool = False) -> str:
        """The template's text for ``messages`` (normalised), e.g. a preference pair's prompt with
        the generation prompt, whose tokens are not scored."""
        return self._render(normalize_messages(messages, row), row, add_generation_prompt)

    # -- helpers ---------------------------------------------------------------------------
    def _render(self, messages, row, add_generation_prompt: bool = False) -> str:
        return self._call(row, messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _call(self, row, messages, **kwargs):
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, **kwargs)
        except TemplateError as exc:
            raise UserError(
                f"Chat data {row_label(row)}: the chat template rejected the conversation ({exc}).",
                "Fix the roles/order of the messages in that row, or set model.chat_template.",
            ) from exc
        except TypeError as exc:
            # Jinja raises plain TypeErrors, e.g. a template that concatenates strings given a
            # content that is a list of parts.
            if not any(isinstance(m.get("content"), list) for m in messages):
                raise
            raise UserError(
                f"Chat data {row_label(row)}: the chat template cannot render message contents that are "
                f"lists of parts ({exc}).",
                "Give every content as a plain string for this model, or set model.chat_template to "
                "a template that renders lists of {\"type\": \"text\"/\"image\"} parts (as "
                "vision-language models' templates do).",
            ) from exc


def opens_conversation(messages: Any) -> bool:
    """Whether ``messages`` is a whole conversation (it starts with a user or system turn), not
    only the assistant's answer: preference sets such as UltraFeedback keep a ``prompt`` string
    next to ``chosen``/``rejected`` conversations that already start with that user turn, which
    must then not be put in front of them a second time."""
    return (isinstance(messages, list) and len(messages) > 1 and isinstance(messages[0], dict)
            and messages[0].get("role") not in (None, "assistant"))


def row_label(row: int | str) -> str:
    """``row 3`` for a table index; a string (a file and its row) is already a label."""
    return f"row {row}" if isinstance(row, int) else row


#: Part types that carry an image (``image_url`` is the OpenAI-style spelling).
IMAGE_PART_TYPES = ("image", "image_url")


def image_parts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The image parts (``{"type": "image", ...}``) of list contents, in order."""
    return [part for message in messages if isinstance(message.get("content"), list)
            for part in message["content"] if isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES]


def reject_image_parts(messages: list[dict[str, Any]], row: int | str) -> None:
    """Text-only models cannot take images: say so instead of silently training on the text."""
    if image_parts(messages):
        raise UserError(
            f"Chat data {row_label(row)} contains images, but the model is text-only (its tokenizer has no "
            "image processor or image token).",
            "Fine-tune a vision-language model (one whose config has a vision_config, e.g. Qwen2-VL "
            "or Gemma 3), or remove the image parts from the data.",
        )


def normalize_messages(messages: Any, row: int | str) -> list[dict[str, Any]]:
    """Validate ``[{role, content}, ...]`` and drop keys Arrow filled with None for other rows."""
    if not isinstance(messages, list) or not messages:
        raise UserError(
            f"Chat data {row_label(row)}: messages must be a non-empty list of "
            f"{{\"role\": ..., \"content\": ...}} objects, got {type(messages).__name__}.",
            "Fix that row, or set data.messages_column to the column holding the conversation.",
        )
    cleaned = []
    for j, message in enumerate(messages):
        if isinstance(message, dict):
            message = {k: v for k, v in message.items() if v is not None}
        # content may only be absent on an assistant message that calls tools
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or ("content" not in message and not message.get("tool_calls"))
        ):
            raise UserError(
                f"Chat data {row_label(row)}, message {j}: expected an object with `role` and `content`, "
                f"got {message!r:.80}.",
                "Every message needs a string role (system/user/assistant) and a content.",
            )
        message.setdefault("content", None)
        cleaned.append(message)
    return cleaned
