"""Write the final model as a Hugging Face directory (or a peft adapter directory)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


def save_final(model: Any, tokenizer: Any, output_dir: Path, *, merge: bool, base_path: Any,
               state_dict: dict[str, Any] | None = None) -> Path:
    """``final/``: the full model (safetensors, config, generation config, tokenizer), or with
    LoRA/DoRA the adapter that ``PeftModel.from_pretrained`` loads; ``final/merged`` when
    ``merge``. ``state_dict`` is the gathered full state of a sharded model (None: the model's
    own). ``base_path`` is what the adapter is recorded against and merged into.

    Writing goes to a temporary directory renamed into place, so ``final/`` is never half written.
    """
    from peft import PeftModel

    final = output_dir / "final"
    staging = output_dir / ".final.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    is_adapter = isinstance(model, PeftModel)
    if is_adapter:
        model.peft_config["default"].base_model_name_or_path = str(base_path)
    kwargs = {"state_dict": state_dict} if state_dict is not None else {}
    model.save_pretrained(staging, safe_serialization=True, **kwargs)
    tokenizer.save_pretrained(staging)
    if is_adapter and merge:
        merge_adapter(base_path, staging, staging / "merged")
        tokenizer.save_pretrained(staging / "merged")
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    return final


def merge_adapter(base_path: Any, adapter_dir: Path, out_dir: Path) -> None:
    """Load the base and the adapter on CPU, fold the adapter into the weights, save."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
