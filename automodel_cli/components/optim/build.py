"""The run's optimizer and learning-rate schedule, chosen by name from their registries.

``optim.name`` picks an optimizer entry (AdamW by default) and ``optim.scheduler`` a schedule
entry; both get the general ``optim.*`` values plus their own options (``optim.NAME.*``). The
schedule is a ``LambdaLR`` over the entry's multiplier, so it checkpoints like any scheduler.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
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
    """Multiplier of the peak lr at 0-based ``step`` for the built-in ``cosine``, ``linear`` and
    ``constant`` schedules: linear warmup, then decay to min_ratio."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * decay_curve(progress, kind)


def decay_curve(progress: float, kind: str) -> float:
    """1 at progress 0 falling to 0 at progress 1: a straight line or half a cosine."""
    return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class OptimizerSettings:
    """What an optimizer entry builds its optimizer from: the model, the peak learning rate, the
    general ``optim.*`` values and the entry's own options (``optim.NAME.*``, defaults filled)."""

    model: Any
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    options: dict[str, Any] = field(default_factory=dict)

    def named_trainable(self) -> list[tuple[str, Any]]:
        return [(name, param) for name, param in self.model.named_parameters() if param.requires_grad]

    def param_groups(self, named: list[tuple[str, Any]] | None = None) -> list[dict[str, Any]]:
        """``named`` (default: every trainable parameter) in two groups: weight decay on matrices
        (and higher), none on biases and norms. The decayed group comes first; an empty group is
        left out (LoRA trains matrices only), since torch's distributed checkpoint cannot load
        the state of an empty parameter group."""
        named = self.named_trainable() if named is None else named
        groups = [
            {"params": [p for _, p in named if p.ndim >= 2], "weight_decay": self.weight_decay},
            {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0},
        ]
        return [group for group in groups if group["params"]] or groups[:1]

    def sharded(self) -> bool:
        """Whether parameters are split over processes (FSDP or tensor parallelism: DTensors)."""
        from torch.distributed.tensor import DTensor

        return any(isinstance(p, DTensor) for _, p in self.named_trainable())


def _registries(registries: Any) -> Any:
    if registries is not None:
        return registries
    from automodel_cli.plugin_host import get_registries

    return get_registries()


def _entry_and_options(registry: Any, optim_cfg: Any, name: str) -> tuple[Any, dict[str, Any]]:
    """Entry ``name`` and its options: defaults overlaid with ``optim.NAME`` of ``optim_cfg``."""
    from automodel_cli.config.compose import options_with_defaults

    entry = registry.get(name)
    return entry, options_with_defaults(entry, getattr(optim_cfg, name, None))


def build_optimizer(model: Any, optim_cfg: Any, lr: float, *, registries: Any = None) -> Any:
    """The optimizer ``optim.name`` names (``adamw`` when the config has no name) over the
    model's trainable parameters."""
    name = getattr(optim_cfg, "name", "adamw")
    entry, options = _entry_and_options(_registries(registries).optimizers, optim_cfg, name)
    settings = OptimizerSettings(model, lr, float(optim_cfg.weight_decay), tuple(float(b) for b in optim_cfg.betas),
                                 float(optim_cfg.eps), options)
    return entry.load()(settings)


def schedule_multiplier(optim_cfg: Any, total_steps: int, *, registries: Any = None) -> Callable[[int], float]:
    """``step -> multiplier of the peak rate`` of the schedule ``optim.scheduler`` names, over
    ``total_steps`` steps (``optim_cfg``: the resolved section, or a saved one)."""
    name = optim_cfg.scheduler
    entry, options = _entry_and_options(_registries(registries).schedulers, optim_cfg, name)
    return functools.partial(entry.load(), warmup=warmup_steps(optim_cfg, total_steps), total=total_steps,
                             min_ratio=float(optim_cfg.min_lr_ratio), options=options)


def build_scheduler(optimizer: Any, optim_cfg: Any, total_steps: int, *, registries: Any = None) -> Any:
    import torch

    multiplier = schedule_multiplier(optim_cfg, total_steps, registries=registries)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def apply_new_settings(optimizer: Any, scheduler: Any, fresh: Any, step: int) -> float:
    """After a resume that changed optimizer or schedule settings (``checkpoint.allow_changes``):
    the restored ``optimizer`` takes the hyperparameters of ``fresh``, an optimizer built from
    the new settings over the same parameters (the same entry, so the same groups), and the
    schedule continues at ``step`` with the rate the new settings give there, as if they had been
    used from the start. The scheduler's multiplier was built from the new settings; loading the
    checkpoint restored only its step and old peak rates. Returns the learning rate of the next
    step (of the first group)."""
    for group, new in zip(optimizer.param_groups, fresh.param_groups, strict=True):
        group.update({key: value for key, value in new.items() if key != "params"})
        group["initial_lr"] = new["lr"]
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    scheduler.last_epoch = step
    for group, base, multiplier in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * multiplier(step)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return scheduler._last_lr[0]
