"""Write the final model as a Hugging Face directory (or a peft adapter directory)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from automodel_cli.run_layout import RunDir


def save_final(model: Any, tokenizer: Any, output_dir: Path, *, merge: bool, base_path: Any,
               pipeline: tuple[Any, dict[str, str]] | None = None) -> Path:
    """``final/``: the full model (safetensors, config, generation config, tokenizer), or with
    LoRA/DoRA the adapter that ``PeftModel.from_pretrained`` loads; ``final/merged`` when
    ``merge``. ``base_path`` is what the adapter is recorded against and merged into.
    ``tokenizer`` is anything with ``save_pretrained``: for a vision-language model pass its
    processor (tokenizer, image processor and chat template are then saved beside the weights, so
    ``AutoProcessor.from_pretrained(final)`` works).

    Collective under a process group: every rank calls it and rank 0 writes. A sharded model is
    gathered one tensor at a time, each written before the next is gathered (``hf_stream``), so
    no rank ever holds the whole model; an adapter is small and is gathered whole.

    Writing goes to a temporary directory renamed into place, so ``final/`` is never half written;
    when the disk refuses the write (full, over quota, read-only) the temporary copy is removed
    and a ``UserError``, raised on every rank, says which checkpoint the run can continue from.
    ``pipeline``: (the pipeline group, tied alias -> name) when each rank holds one pipeline
    stage: rank 0 receives the other stages' tensors.
    """
    from peft import PeftModel

    from automodel_cli.components.checkpoint import collective
    from automodel_cli.components.distributed.parallelize import gather_full_state_dict
    from automodel_cli.components.models import hf_stream
    from automodel_cli.components.peft import quantize

    is_main = collective.rank() == 0
    final = RunDir(output_dir).final
    staging = output_dir / ".final.tmp"
    is_adapter = isinstance(model, PeftModel)
    if is_adapter:
        model.peft_config["default"].base_model_name_or_path = str(base_path)

    def write() -> None:
        try:
            if is_main:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            if is_adapter:
                adapter = (gather_full_state_dict(model, trainable_only=True, everywhere=pipeline is not None)
                           if collective.active() else None)
                stages = _join_stages(adapter, pipeline[0]) if pipeline is not None else None
                if is_main:
                    model.save_pretrained(staging, safe_serialization=True,
                                          **({"state_dict": adapter} if adapter is not None else {}))
                    if stages is not None:
                        _add_other_stages(staging, stages, model.active_adapter)
                    quantize.record(staging, model)
            else:
                hf_stream.write_weights(model, staging if is_main else None, pipeline=pipeline)
                if is_main:
                    hf_stream.write_model_files(model, staging)
            if is_main:
                tokenizer.save_pretrained(staging)
                if is_adapter and merge:
                    merge_adapter(base_path, staging, staging / "merged", config=_head_config(model))
                    tokenizer.save_pretrained(staging / "merged")
        except Exception as exc:
            if is_main:
                shutil.rmtree(staging, ignore_errors=True)  # frees the space a partial copy took
            disk = _disk_error(exc, output_dir, _output_bytes(model, is_adapter))
            if disk is None:
                raise
            raise disk from None

    collective.run_agreed(write)  # a failure on any rank is raised on every rank
    if is_main:
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    return final


def _join_stages(tensors: dict[str, Any], group: Any) -> dict[str, Any]:
    """The union of every pipeline rank's ``tensors`` (collective over ``group``)."""
    from automodel_cli.components.checkpoint.collective import gather

    everyone = gather({name: value.cpu() for name, value in tensors.items()}, group)
    return {name: value for part in everyone for name, value in part.items()}


def _add_other_stages(directory: Path, tensors: dict[str, Any], adapter: str) -> None:
    """Complete the adapter file rank 0 wrote for its own pipeline stage (peft saves the adapter
    layers it finds in the model it is given) with every stage's weights, under the names peft
    writes (``adapter_key``)."""
    from safetensors.torch import load_file, save_file

    from automodel_cli.components.checkpoint.consolidate import adapter_key

    path = directory / "adapter_model.safetensors"
    written = load_file(path)
    written.update({adapter_key(name, adapter): value.contiguous() for name, value in tensors.items()})
    save_file(written, path, metadata={"format": "pt"})


def _output_bytes(model: Any, is_adapter: bool) -> int:
    """About what ``final/`` holds: the adapter weights, or the model (global sizes when sharded)."""
    tensors = [p for p in model.parameters() if p.requires_grad] if is_adapter else list(model.state_dict().values())
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


def _head_config(model: Any) -> Any | None:
    """The trained model's config when it declares a task head (a sequence classifier trained on
    a causal LM's weights: its labels and pad token live there, not in the base's config)."""
    from automodel_cli.components.models.heads import declared_head

    config = getattr(model, "config", None)
    return config if config is not None and declared_head(config) is not None else None


def merge_adapter(base_path: Any, adapter_dir: Path, out_dir: Path, config: Any = None) -> None:
    """Load the base (with the auto class its config calls for: a VLM's is image-text-to-text)
    and the adapter on CPU, fold the adapter into the weights, save. A QLoRA adapter (its
    ``quantization.json``) is merged into the dequantized base: the weights it was trained with.
    ``config``: the trained model's config where it is not the base's (a task head, whose weights
    the adapter holds whole)."""
    from transformers import AutoConfig

    from automodel_cli.components.models.adapters import load_adapted
    from automodel_cli.components.models.vlm import auto_class

    config = config if config is not None else AutoConfig.from_pretrained(base_path)
    base = auto_class(config).from_pretrained(base_path, config=config)
    merged = load_adapted(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
