"""Image + text SFT data for vision-language models: read, normalise, encode with the processor.

Three schemas are accepted, row by row (so one file may mix them, and text-only rows):

- chat: a ``messages`` column whose ``content`` is a string or a list of parts,
  ``{"type": "text", "text": ...}`` and ``{"type": "image", "image": REF}`` (also ``"path"``,
  ``"url"``, or OpenAI-style ``{"type": "image_url", "image_url": {"url": REF}}``); bare
  ``{"type": "image"}`` parts take their images, in order, from an ``images``/``image`` column;
- prompt/completion with an ``image`` (or ``images``) column: the images, then the prompt, as the
  user turn; the completion as the assistant turn;
- CORD-v2 style (receipt parsing): an ``image`` and a ``ground_truth`` JSON string whose
  ``gt_parse`` (or first of ``gt_parses``) is the target, written as ``<s_key>value</s_key>``
  tokens (keys sorted) after the fixed instruction ``CORD_PROMPT``.

An image REF is a path (relative paths are relative to the data file's directory), a base64
string or ``data:`` URL, an ``http(s)`` URL, or a ``datasets`` ``Image`` value (PIL image or
``{"bytes", "path"}``).

Why JSON rows are read with ``json`` and not Arrow: a content that is a string in one row and a
list of parts in the next (text-only rows mixed with image rows) has no single Arrow schema. The
``vlm`` dataset factory therefore returns a normalised table: ``messages`` (the conversation as
JSON text, image parts reduced to ``{"type": "image"}``), ``images`` (the REFs, in order) and
``source`` (file and row, for error messages).

Encoding renders the conversation with the processor's chat template, runs the processor on the
text and images (it expands each image placeholder to the image's tokens and returns the image
tensors), and trains only assistant text. Which tokens those are is found as for text chat
(chat.py): the template is rendered up to each assistant turn, and the processor's token count
for that prefix (with the prefix's images) is where the turn starts; image/vision tokens inside
an assistant turn are masked too.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automodel_cli.components.data.tokenization import (
    IGNORE_INDEX, TRUNCATION_WARN_FRACTION, SFTStats, TruncationWarning, all_masked_message, common_prefix_length,
)
from automodel_cli.errors import UserError

#: The instruction of CORD-v2-style rows (their target is a parse of the receipt).
CORD_PROMPT = "Describe this image."

#: Keys of an image part that may hold the image.
_IMAGE_KEYS = ("image", "path", "url", "image_url")

#: Per-token outputs of processors besides ``input_ids`` (Gemma 3 marks image tokens with
#: ``token_type_ids``; newer processors add ``mm_token_type_ids``).
PER_TOKEN_KEYS = ("token_type_ids", "mm_token_type_ids")


@dataclass(frozen=True)
class Columns:
    """Column names of the accepted schemas. The ``vlm`` dataset factory uses these defaults
    (a factory sees only its options); callers of ``load_multimodal`` may name others."""

    messages: str = "messages"
    prompt: str = "prompt"
    completion: str = "completion"
    image: str = "image"
    images: str = "images"
    ground_truth: str = "ground_truth"


# ------------------------------------------------------------------------------------ loading


def vlm(path: str | None, split: str, options: dict[str, Any]):
    """The ``vlm`` dataset factory: ``data.path`` read and normalised (see the module docstring)."""
    return load_multimodal(path, split, options)


def load_multimodal(path: str | None, split: str, options: dict[str, Any], columns: Columns = Columns()):
    """``datasets.Dataset`` with ``messages`` (JSON text), ``images`` and ``source`` columns."""
    import datasets

    if not path:
        raise UserError(
            "No training data: data.path is not set.",
            "Set data.path to a jsonl/json file (or parquet/csv, a directory of them, or a hub id) "
            "with image-text rows.",
        )
    messages, images, sources = [], [], []
    for where, base_dir, row in _rows(path, split, options):
        conversation, refs = normalize_record(row, columns, base_dir, where)
        messages.append(json.dumps(conversation))
        images.append(refs)
        sources.append(where)
    return datasets.Dataset.from_dict({"messages": messages, "images": images, "source": sources})


def _rows(path: str, split: str, options: dict[str, Any]):
    """``(where, base_dir, row)`` for every row: JSON files parsed with ``json`` (see the module
    docstring), anything else (parquet, csv, hub datasets with ``Image`` features) via datasets."""
    from automodel_cli.components.data.loading import SUPPORTED_EXTENSIONS, _data_files, load_table, read_json_rows

    local = Path(str(path)).expanduser()
    if local.exists():
        files = _data_files(local, split)
        if all(SUPPORTED_EXTENSIONS[f.suffix.lower()] == "json" for f in files):
            if "[" in split:
                raise UserError(f"data.split={split}: slices are not supported for JSON image-text data.",
                                "Use data.split=train, and data.eval_size to hold samples out.")
            for file, number, row in read_json_rows(local, split, options):
                yield f"`{file}` row {number}", file.parent, row
            return
        base_dir = files[0].parent if len(files) == 1 else local
    else:
        base_dir = Path.cwd()
    table = load_table(path, split, options)
    for index, row in enumerate(table, start=1):
        yield f"`{path}` row {index}", base_dir, row


def normalize_record(row: dict[str, Any], columns: Columns, base_dir: Path,
                     where: str) -> tuple[list[dict[str, Any]], list[Any]]:
    """One row in any accepted schema -> ``(messages, image REFs)``; image parts become
    ``{"type": "image"}`` and REFs that are relative paths are resolved against ``base_dir``."""
    from automodel_cli.components.data.chat import normalize_messages

    column_images = _as_list(row.get(columns.images)) or _as_list(row.get(columns.image))
    if row.get(columns.messages) is not None:
        messages = normalize_messages(row[columns.messages], where)
        refs: list[Any] = []
        unnamed = iter(column_images)  # what bare {"type": "image"} parts stand for, in order
        messages = [{**m, "content": _parts(m, unnamed, refs, columns, where)} if isinstance(m["content"], list) else m
                    for m in messages]
    elif row.get(columns.ground_truth) is not None:
        refs = column_images
        messages = [
            {"role": "user", "content": [*({"type": "image"} for _ in refs), {"type": "text", "text": CORD_PROMPT}]},
            {"role": "assistant", "content": [{"type": "text", "text": _cord_target(row[columns.ground_truth], where)}]},
        ]
    elif columns.prompt in row and columns.completion in row:
        refs = column_images
        prompt, completion = (_text(row[c], c, where) for c in (columns.prompt, columns.completion))
        messages = [
            {"role": "user", "content": [*({"type": "image"} for _ in refs), {"type": "text", "text": prompt}]},
            {"role": "assistant", "content": [{"type": "text", "text": completion}]},
        ]
    else:
        raise UserError(
            f"Data {where} has none of the image-text schemas (columns: {sorted(row)}).",
            f"Give each row `{columns.messages}` (chat with text/image parts), `{columns.prompt}` + "
            f"`{columns.completion}` (with an optional `{columns.image}`), or `{columns.image}` + "
            f"`{columns.ground_truth}` (CORD-v2 style).",
        )
    return messages, [_resolve(ref, base_dir, where) for ref in refs]


def _parts(message: dict[str, Any], unnamed: Any, refs: list[Any], columns: Columns, where: str) -> list[dict]:
    """A list content with image parts reduced to ``{"type": "image"}``; their REFs go to ``refs``."""
    from automodel_cli.components.data.chat import IMAGE_PART_TYPES

    parts = []
    for part in message["content"]:
        if isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES:
            ref = _part_ref(part)
            if ref is None:
                ref = next(unnamed, None)
            if ref is None:
                raise UserError(
                    f"Data {where}: more image parts than images in the `{columns.images}`/`{columns.image}` column.",
                    "Give each image part its image ({\"type\": \"image\", \"image\": PATH}) "
                    "or list one image per part in the images column.",
                )
            refs.append(ref)
            parts.append({"type": "image"})
        elif isinstance(part, dict) and part.get("type") == "text":
            parts.append({"type": "text", "text": str(part.get("text") or "")})
        else:
            raise UserError(
                f"Data {where}, role {message['role']}: content part {part!r:.80} is neither a text "
                "nor an image part.",
                "Parts look like {\"type\": \"text\", \"text\": ...} or "
                "{\"type\": \"image\", \"image\": PATH_OR_URL_OR_BASE64}.",
            )
    return parts


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return [v for v in value if v is not None] if isinstance(value, (list, tuple)) else [value]


def _part_ref(part: dict[str, Any]) -> Any:
    for key in _IMAGE_KEYS:
        value = part.get(key)
        if isinstance(value, dict) and key == "image_url":
            value = value.get("url")
        if value is not None:
            return value
    return None


def _text(value: Any, column: str, where: str) -> str:
    if isinstance(value, str):
        return value
    raise UserError(f"Data {where}: column `{column}` holds {type(value).__name__}, not text.",
                    "Fix that row; prompts and completions are strings.")


def _cord_target(ground_truth: Any, where: str) -> str:
    """The target text of a CORD-v2 row: its parse as ``<s_key>value</s_key>`` tokens."""
    try:
        parsed = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
        target = parsed["gt_parses"][0] if "gt_parses" in parsed else parsed["gt_parse"]
    except (json.JSONDecodeError, TypeError, KeyError, IndexError) as exc:
        raise UserError(
            f"Data {where}: `ground_truth` is not a JSON object with a `gt_parse` ({type(exc).__name__}: {exc}).",
            "CORD-v2-style rows hold ground_truth = '{\"gt_parse\": {...}}' (a JSON string).",
        ) from exc
    return json_to_tokens(target)


def json_to_tokens(value: Any) -> str:
    """A parse as text: ``{"k": v}`` -> ``<s_k>v</s_k>`` (keys sorted), lists joined by ``<sep/>``;
    the format the CORD-v2 receipt-parsing task is trained and scored in."""
    if isinstance(value, dict):
        return "".join(f"<s_{key}>{json_to_tokens(value[key])}</s_{key}>" for key in sorted(value))
    if isinstance(value, list):
        return "<sep/>".join(json_to_tokens(item) for item in value)
    return str(value)


def _resolve(ref: Any, base_dir: Path, where: str) -> Any:
    """Relative paths become absolute and must exist (checked now, when file and row are known)."""
    if not isinstance(ref, str):
        return ref  # PIL image or datasets Image dict
    if ref.startswith(("data:", "http://", "https://")) or _looks_base64(ref):
        return ref
    file = Path(ref).expanduser()
    file = file if file.is_absolute() else base_dir / file
    if not file.is_file():
        raise UserError(
            f"Data {where}: image file `{ref}` does not exist (looked for {file}).",
            "Image paths are relative to the data file's directory; fix the path or add the file.",
        )
    return str(file)


def _looks_base64(text: str) -> bool:
    """Long and only base64 characters: no file name looks like that (paths have a suffix)."""
    return len(text) >= 64 and _BASE64.fullmatch(text) is not None


_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")


# ------------------------------------------------------------------------------------ images


def load_image(ref: Any, where: str):
    """A REF as an RGB ``PIL.Image``; anything unreadable is a ``UserError`` naming the row."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    what = "the image"
    try:
        if isinstance(ref, dict):  # datasets Image feature, not decoded
            data = ref.get("bytes")
            what = f"image `{ref.get('path')}`"
            stream = io.BytesIO(data) if data is not None else open(ref["path"], "rb")
        elif ref.startswith(("http://", "https://")):
            what = f"image URL `{ref}`"
            stream = io.BytesIO(_download(ref))
        elif ref.startswith("data:") or not Path(ref).is_file():
            what = "the base64 image"
            stream = io.BytesIO(base64.b64decode(ref.split(",", 1)[1] if ref.startswith("data:") else ref,
                                                 validate=True))
        else:
            what = f"image file `{ref}`"
            stream = open(ref, "rb")
        with stream:
            image = Image.open(stream)
            image.load()
        return image.convert("RGB")
    except (UnidentifiedImageError, binascii.Error, ValueError, OSError) as exc:
        raise UserError(
            f"Data {where}: {what} cannot be read as an image ({type(exc).__name__}: {str(exc)[:120]}).",
            "Give a PNG/JPEG/WebP/GIF file, a base64 string of one, or a reachable URL; or remove the row.",
        ) from exc


def _download(url: str) -> bytes:
    from urllib.request import urlopen

    with urlopen(url, timeout=30) as response:  # noqa: S310 - http(s) only, checked by the caller
        return response.read()


# ---------------------------------------------------------------------------------- encoding


def apply_resolution_limits(processor: Any, min_pixels: int | None, max_pixels: int | None) -> None:
    """Set the image processor's resolution range (data.min_pixels / data.max_pixels) in place,
    so the processor saved beside the weights keeps it. Only processors with a dynamic
    resolution (Qwen2-VL style: ``size`` has ``shortest_edge``/``longest_edge`` in pixels) take
    it; others resize every image to one size, which the limits cannot change."""
    if min_pixels is None and max_pixels is None:
        return
    image_processor = getattr(processor, "image_processor", None)
    size = getattr(image_processor, "size", None)
    dynamic = "min_pixels" in getattr(getattr(image_processor, "valid_kwargs", None), "__annotations__", {})
    if not dynamic or getattr(size, "shortest_edge", None) is None or getattr(size, "longest_edge", None) is None:
        raise UserError(
            f"data.min_pixels/data.max_pixels apply to image processors with a dynamic resolution "
            f"(Qwen2-VL style); {type(image_processor).__name__} resizes every image to one size.",
            "Unset data.min_pixels and data.max_pixels for this model.",
        )
    low = min_pixels if min_pixels is not None else size.shortest_edge
    high = max_pixels if max_pixels is not None else size.longest_edge
    if low > high:
        raise UserError(f"data.min_pixels={low} is larger than data.max_pixels={high}.",
                        "Set data.min_pixels <= data.max_pixels.")
    image_processor.size = dataclasses.replace(size, shortest_edge=low, longest_edge=high)


class MultimodalEncoder:
    """One conversation with its images -> a VLM training sample (see VLMCollator)."""

    def __init__(self, processor: Any, chat_template: str | None = None):
        from automodel_cli.components.data.chat import ChatEncoder, resolve_template

        tokenizer = getattr(processor, "tokenizer", None)
        image_token = getattr(processor, "image_token", None)
        if tokenizer is None or getattr(processor, "image_processor", None) is None or image_token is None:
            raise UserError(
                "The data has images, but the model is text-only: it has no image processor or "
                "image token to turn them into model inputs.",
                "Fine-tune a vision-language model (one whose config has a vision_config, e.g. "
                "Qwen2-VL or Gemma 3), or remove the images from the data.",
            )
        self.processor = processor
        self.image_token = image_token
        self.chat = ChatEncoder(tokenizer, resolve_template(processor, chat_template), IGNORE_INDEX)
        # Ids that stand for images (placeholder, soft tokens, vision start/end): never trained.
        names = [image_token] + [getattr(processor, n, None) or getattr(tokenizer, n, None) for n in
                                 ("boi_token", "eoi_token", "vision_start_token", "vision_end_token")]
        names += [getattr(tokenizer, "image_token", None), "<|vision_start|>", "<|vision_end|>"]
        vocab = tokenizer.get_vocab()
        self.image_ids = {vocab[n] for n in names if isinstance(n, str) and n in vocab}

    def encode(self, messages: list[dict[str, Any]], images: list[Any], where: str) -> dict[str, Any]:
        """``{"input_ids", "labels", and the processor's image tensors}`` for one sample."""
        text, spans = self.chat.assistant_spans(messages, where)
        n_placeholders = text.count(self.image_token)
        if n_placeholders != len(images):
            raise UserError(
                f"Data {where}: {len(images)} image(s) but the rendered text has {n_placeholders} image "
                f"placeholder(s) (`{self.image_token}`).",
                "Give one image part per image and do not write image tokens into the text yourself.",
            )
        pictures = [load_image(ref, where) for ref in images]
        full = self._process(text, pictures, where)
        ids = full.pop("input_ids")
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in spans:
            first, last = (self._prefix_length(text[:cut], pictures, ids, where) for cut in (start, end))
            labels[first:last] = ids[first:last]
        labels = [IGNORE_INDEX if token in self.image_ids else label for token, label in zip(ids, labels)]
        full.pop("attention_mask", None)
        return {"input_ids": ids, "labels": labels, **full}

    def _process(self, text: str, pictures: list[Any], where: str) -> dict[str, Any]:
        try:
            out = self.processor(text=[text], images=pictures or None, add_special_tokens=False, return_tensors="pt")
        except ValueError as exc:  # e.g. image/token count mismatch, bad image sizes
            raise UserError(f"Data {where}: the processor refused the sample ({exc}).",
                            "Check the images and the text of that row.") from exc
        sample: dict[str, Any] = {}
        for key, value in out.items():
            if key in ("input_ids", "attention_mask", *PER_TOKEN_KEYS):
                sample[key] = value[0].tolist()
            else:
                sample[key] = value
        return sample

    def _prefix_length(self, prefix: str, pictures: list[Any], full_ids: list[int], where: str) -> int:
        """Tokens of the rendered ``prefix`` (with the images it shows), i.e. the index in the full
        sample where the text after it starts; the common prefix guards against a token that
        spans the border."""
        if not prefix:
            return 0
        shown = pictures[:prefix.count(self.image_token)]
        return common_prefix_length(self._process(prefix, shown, where)["input_ids"], full_ids)


def encode_multimodal(table: Any, processor: Any, *, max_length: int,
                      chat_template: str | None = None) -> tuple[list[dict[str, Any]], SFTStats]:
    """Encode a ``load_multimodal`` table: ``(samples, SFTStats)``, like ``tokenize_sft``.

    Truncation keeps ``max_length`` tokens, but never cuts through image tokens (the model needs
    every token of an image): such samples are dropped and counted in ``n_dropped``, as are
    samples with no trained token left. Warns (``TruncationWarning``) when more than 10% were
    truncated or dropped for length; refuses when nothing is left to train."""
    if not isinstance(max_length, int) or max_length < 2:
        raise UserError(f"data.max_length must be an integer >= 2, got {max_length!r}.",
                        "Set data.max_length to the longest sequence (in tokens) to train on, e.g. 2048.")
    encoder = _encoder(processor, chat_template, table)
    samples, n_tokens, n_trained, n_truncated, n_dropped, longest = [], 0, 0, 0, 0, 0
    for record in table:
        messages, refs, where = json.loads(record["messages"]), record["images"], record["source"]
        sample = encoder.encode(messages, refs, where)
        length = len(sample["input_ids"])
        longest = max(longest, length)
        if length > max_length:
            n_truncated += 1
            if any(token in encoder.image_ids for token in sample["input_ids"][max_length:]):
                n_dropped += 1
                continue
            for key in ("input_ids", "labels", *PER_TOKEN_KEYS):
                if key in sample:
                    sample[key] = sample[key][:max_length]
        sample["labels"][0] = IGNORE_INDEX  # never predicted: nothing precedes it
        trained = sum(1 for label in sample["labels"] if label != IGNORE_INDEX)
        if not trained:
            n_dropped += 1
            continue
        samples.append(sample)
        n_tokens += len(sample["input_ids"])
        n_trained += trained
    stats = SFTStats(n_samples=len(table), n_truncated=n_truncated, n_trainable_tokens=n_trained,
                     n_tokens=n_tokens, n_dropped=n_dropped, longest=longest)
    if not samples:
        raise UserError(*all_masked_message(stats, "chat", max_length, "prompt", "completion"))
    if n_truncated > TRUNCATION_WARN_FRACTION * stats.n_samples:
        warnings.warn(TruncationWarning(
            f"{n_truncated} of {stats.n_samples} samples ({100 * stats.truncated_fraction:.1f}%) are longer "
            f"than data.max_length={max_length} tokens (longest: {longest}); those whose image tokens "
            "would be cut were dropped, the others truncated. Raise data.max_length or lower "
            "data.max_pixels to keep them whole."), stacklevel=2)
    return samples, stats


def _encoder(processor: Any, chat_template: str | None, table: Any):
    """The encoder; for a text-only tokenizer, a refusal that names the first row with images."""
    if getattr(processor, "image_processor", None) is None:
        from automodel_cli.components.data.chat import reject_image_parts

        for refs, where in zip(table["images"], table["source"]):
            if refs:
                reject_image_parts([{"role": "user", "content": [{"type": "image"}]}], where)
    return MultimodalEncoder(processor, chat_template)
