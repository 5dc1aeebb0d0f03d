"""Turn a loaded model into the model a recipe trains, as the config says."""

from __future__ import annotations

import contextlib
from typing import Any

from automodel_cli.run_layout import RunDir


def init_device(cfg: Any, device: Any) -> Any:
    """Context to build the model in: random weights are created directly on the training
    device (a GPU initialises an 8B model in seconds, and no rank holds a CPU copy); weights
    loaded from disk go through the usual CPU path."""
    import torch

    if cfg.model.from_scratch and device.type != "cpu":
        return torch.device(device)
    return contextlib.nullcontext()


def adapter_base(model: Any, tokenizer: Any, cfg: Any, output_dir: Any, is_main: bool) -> str:
    """Where the base weights of the trained model live, for adapter outputs and merges.

    An adapter needs its base weights: a random base (``model.from_scratch`` with LoRA/DoRA)
    exists nowhere else, so rank 0 saves it as ``OUTPUT_DIR/base_model`` before training."""
    from automodel_cli.components.models.loading import resolve_model_source
    from automodel_cli.components.training import run_lock

    if not (cfg.model.from_scratch and cfg.peft.method != "none"):
        return resolve_model_source(cfg.model.path)
    base_dir = RunDir(output_dir).base_model
    if is_main:
        run_lock.mark_writing(output_dir)
        model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
    return str(base_dir.resolve())


def prepare_model(model: Any, cfg: Any, *, precision: Any, mesh: Any, shape: Any, registries: Any,
                  sequence_parallel: bool = False) -> Any:
    """Activation checkpointing, adapters (peft.method), device, torch.compile and, on several
    processes, the tensor-parallel plan and FSDP2; returns the model in train mode."""
    from automodel_cli.components.distributed.parallelize import parallelize_model
    from automodel_cli.config.compose import entry_options
    from automodel_cli.components.peft.lora import apply_peft
    from automodel_cli.components.training.memory import compile_decoder_layers, enable_activation_checkpointing

    distributed = mesh is not None
    if not distributed:
        enable_activation_checkpointing(model, cfg.train.activation_checkpointing)
    model = apply_peft(model, cfg.peft)
    model.to(precision.device)
    model.train()
    if cfg.train.compile and not distributed:
        compile_decoder_layers(model, cfg.train.compile_backend)
    if distributed:
        model = parallelize_model(
            model, mesh, plan_registry=registries.parallel_plans, tp=shape.tp,
            plan_options=lambda model_type: entry_options(cfg, registries.parallel_plans, model_type),
            sequence_parallel=sequence_parallel,
            activation_checkpointing=cfg.train.activation_checkpointing,
            mixed_precision=precision.autocast_dtype is not None,
            compile=cfg.train.compile, compile_backend=cfg.train.compile_backend)
    return model
