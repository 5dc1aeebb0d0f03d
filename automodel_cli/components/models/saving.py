"""Write the final model as a Hugging Face directory (or a peft adapter directory)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_final(model: Any, tokenizer: Any, output_dir: Path, *, merge: bool, base_dir: Path | None) -> Path:
    """``final/``: the full model (safetensors, config, generation config, tokenizer), or with
    LoRA the adapter that ``PeftModel.from_pretrained`` loads; ``final/merged`` when ``merge``.

    Writing goes to a temporary directory renamed into place, so ``final/`` is never half written.
    """
    import shutil

    from peft import PeftModel

    final = output_dir / "final"
    staging = output_dir / ".final.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    is_adapter = isinstance(model, PeftModel)
    if is_adapter and base_dir is not None:
        model.peft_config["default"].base_model_name_or_path = str(base_dir.resolve())
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if is_adapter and merge:
        merged = model.merge_and_unload()
        merged.save_pretrained(staging / "merged", safe_serialization=True)
        tokenizer.save_pretrained(staging / "merged")
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    return final
