"""peft adapter directories: what they record, which base they belong to, loading them on it.

Shared by ``automodel convert merge-lora`` (which folds an adapter into its base) and
``automodel evaluate`` (which evaluates it on its base, unmerged, as training computed it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from automodel_cli.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_HINT = "Pass the directory that peft's save_pretrained wrote (adapter_config.json + adapter_model.safetensors)."


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(adapter: Path, hint: str = ADAPTER_HINT) -> dict[str, Any]:
    """``adapter_config.json`` of the adapter directory ``adapter``, after checking that the
    directory holds an adapter's weights; ``UserError`` otherwise."""
    config_path = adapter / ADAPTER_CONFIG
    if not config_path.is_file():
        raise UserError(f"Adapter directory {adapter} has no {ADAPTER_CONFIG}, so it is not a peft adapter.", hint)
    try:
        adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{config_path} cannot be read ({exc}).", hint) from None
    if not isinstance(adapter_config, dict):
        raise UserError(f"{config_path} does not hold a JSON object.", hint)
    if not any((adapter / f"adapter_model.{ext}").is_file() for ext in ("safetensors", "bin")):
        raise UserError(f"Adapter directory {adapter} has no adapter_model.safetensors.", hint)
    return adapter_config


def resolve_adapter_base(adapter: Path, adapter_config: dict[str, Any], base: str | None = None,
                         flag: str = "--base") -> str:
    """The base model of ``adapter``: ``base`` when given (a directory or a hub id), else the
    ``base_model_name_or_path`` it records (a directory, relative to the adapter or not, or a
    hub id that ``from_pretrained`` finds). ``flag`` is the option that overrides it."""
    if base is not None:
        path = Path(base).expanduser()
        if path.is_dir():
            return str(path.resolve())
        if path.exists() or base.startswith((".", "/", "~")) or base.count("/") > 1:
            raise UserError(f"{flag} {base} is not a model directory.",
                            f"Pass {flag} DIR (a Hugging Face model directory) or a hub model id.")
        return base  # a hub id: from_pretrained finds it (in the cache when offline)
    recorded = adapter_config.get("base_model_name_or_path")
    if not isinstance(recorded, str) or not recorded:
        raise UserError(f"{adapter / ADAPTER_CONFIG} records no base_model_name_or_path.",
                        f"Pass {flag} DIR with the model the adapter was trained on.")
    path = Path(recorded).expanduser()
    if not path.is_absolute() and (adapter / path).is_dir() and not path.is_dir():
        path = adapter / path
    if path.is_dir():
        return str(path.resolve())
    if path.is_absolute() or recorded.startswith((".", "~")) or recorded.count("/") > 1:
        raise UserError(f"The base model {recorded!r} recorded in {adapter / ADAPTER_CONFIG} does not exist.",
                        f"Pass {flag} DIR with the model the adapter was trained on.")
    return recorded


def load_adapted(base: Any, adapter_dir: Path) -> Any:
    """``PeftModel`` of the adapter in ``adapter_dir`` on the loaded ``base`` model. A QLoRA
    adapter (its ``quantization.json``) goes on the dequantized base: the weights it was
    trained against."""
    from peft import PeftModel

    from automodel_cli.components.peft import quantize

    method = quantize.recorded_method(adapter_dir)
    if method is not None:
        quantize.dequantize_base(base, method)
    return PeftModel.from_pretrained(base, adapter_dir)
