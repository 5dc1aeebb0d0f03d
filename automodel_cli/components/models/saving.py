"""Write the final model as a Hugging Face directory (or a peft adapter directory)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from automodel_cli.run_layout import RunDir


def save_final(model: Any, tokenizer: Any, output_dir: Path, *, merge: bool, base_path: Any,
               state_dict: dict[str, Any] | None = None) -> Path:
    """``final/``: the full model (safetensors, config, generation config, tokenizer), or with
    LoRA/DoRA the adapter that ``PeftModel.from_pretrained`` loads; ``final/merged`` when
    ``merge``. ``state_dict`` is the gathered full state of a sharded model (None: the model's
    own). ``base_path`` is what the adapter is recorded against and merged into.

    Writing goes to a temporary directory renamed into place, so ``final/`` is never half written;
    when the disk refuses the write (full, over quota, read-only) the temporary copy is removed
    and a ``UserError`` says which checkpoint the run can continue from.
    """
    from peft import PeftModel

    final = RunDir(output_dir).final
    staging = output_dir / ".final.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    is_adapter = isinstance(model, PeftModel)
    if is_adapter:
        model.peft_config["default"].base_model_name_or_path = str(base_path)
    kwargs = {"state_dict": state_dict} if state_dict is not None else {}
    try:
        model.save_pretrained(staging, safe_serialization=True, **kwargs)
        tokenizer.save_pretrained(staging)
        if is_adapter and merge:
            merge_adapter(base_path, staging, staging / "merged")
            tokenizer.save_pretrained(staging / "merged")
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)  # frees the space a partial copy took
        disk = _disk_error(exc, output_dir, _output_bytes(model, state_dict, is_adapter))
        if disk is None:
            raise
        raise disk from None
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    return final


def _output_bytes(model: Any, state_dict: dict[str, Any] | None, is_adapter: bool) -> int:
    """About what ``final/`` holds: the gathered state, the adapter weights, or the model."""
    if state_dict is not None:
        tensors = list(state_dict.values())
    elif is_adapter:
        tensors = [p for p in model.parameters() if p.requires_grad]
    else:
        tensors = list(model.state_dict().values())
    return sum(t.numel() * t.element_size() for t in tensors if hasattr(t, "element_size"))


def _disk_error(exc: Exception, output_dir: Path, needed: int) -> Exception | None:
    """A ``UserError`` for a write that failed because of the disk (None for anything else),
    naming the run's newest checkpoint, which the failed write did not touch."""
    from automodel_cli.components.checkpoint import layout, storage

    error = storage.storage_error(exc)
    if error is None:
        return None
    latest = layout.resolve_latest(layout.checkpoints_root(output_dir))
    return storage.final_write_failed(error, output_dir=output_dir, latest=latest, needed=needed)


def merge_adapter(base_path: Any, adapter_dir: Path, out_dir: Path) -> None:
    """Load the base and the adapter on CPU, fold the adapter into the weights, save."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
