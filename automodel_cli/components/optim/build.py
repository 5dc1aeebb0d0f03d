"""AdamW plus a warmup + cosine/linear/constant schedule (a LambdaLR, so it checkpoints)."""

from __future__ import annotations

import math
from typing import Any

DEFAULT_LR = {"none": 2e-5, "lora": 1e-4, "dora": 1e-4, "qlora": 1e-4}


def peak_lr(optim_cfg: Any, peft_method: str) -> float:
    """``optim.lr`` or, when unset, the customary rate for full fine-tuning or adapters."""
    return float(optim_cfg.lr) if optim_cfg.lr is not None else DEFAULT_LR[peft_method]


def warmup_steps(optim_cfg: Any, total_steps: int) -> int:
    """An int is a step count; a float below 1 is a fraction of all steps."""
    value = optim_cfg.warmup_steps
    if isinstance(value, float) and value < 1:
        return int(round(value * total_steps))
    return int(value)


def lr_multiplier(step: int, *, warmup: int, total: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at 0-based ``step``: linear warmup, then decay to min_ratio."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        decay = 1.0 - progress
    else:  # cosine
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay


def build_optimizer(model: Any, optim_cfg: Any, lr: float) -> Any:
    """AdamW over trainable parameters; no weight decay on biases and norms."""
    import torch

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": float(optim_cfg.weight_decay)}]
    if no_decay:  # LoRA trains no bias or norm: torch's distributed checkpoint cannot load an empty group
        groups.append({"params": no_decay, "weight_decay": 0.0})
    betas = tuple(float(b) for b in optim_cfg.betas)
    # The foreach implementation is the fastest that runs everywhere (fused is CUDA/CPU-only).
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=float(optim_cfg.eps), foreach=True)


def build_scheduler(optimizer: Any, optim_cfg: Any, total_steps: int) -> Any:
    import functools

    import torch

    multiplier = functools.partial(
        lr_multiplier,
        warmup=warmup_steps(optim_cfg, total_steps),
        total=total_steps,
        kind=optim_cfg.scheduler,
        min_ratio=float(optim_cfg.min_lr_ratio),
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def apply_new_settings(optimizer: Any, scheduler: Any, optim_cfg: Any, lr: float, step: int) -> float:
    """After a resume that changed optimizer or schedule settings (``checkpoint.allow_changes``):
    the restored optimizer takes the new hyperparameters, and the schedule continues at ``step``
    with the rate the new settings give there, as if they had been used from the start. The
    scheduler's multiplier was built from the new settings; loading the checkpoint restored only
    its step and old peak rate. Returns the learning rate of the next step."""
    decay_group = optimizer.param_groups[0]  # build_optimizer's order: decayed weights first
    decay_group["weight_decay"] = float(optim_cfg.weight_decay)
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
        group["betas"] = tuple(float(b) for b in optim_cfg.betas)
        group["eps"] = float(optim_cfg.eps)
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    scheduler.last_epoch = step
    for group, multiplier in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = lr * multiplier(step)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return scheduler._last_lr[0]
