"""The built-in optimizers (``plugins/optimizers.py`` registers them): each is
``build(settings) -> torch.optim.Optimizer`` over ``settings.param_groups()`` (weight decay on
matrices, none on biases and norms), its own options in ``settings.options``."""

from __future__ import annotations

import types
from typing import Any

from automodel_cli.components.optim.build import OptimizerSettings
from automodel_cli.errors import UserError


def adamw(settings: OptimizerSettings) -> Any:
    """torch AdamW with ``optim.betas`` and ``optim.eps``."""
    import torch

    # The foreach implementation is the fastest that runs everywhere (fused is CUDA/CPU-only).
    return torch.optim.AdamW(settings.param_groups(), lr=settings.lr, betas=settings.betas, eps=settings.eps,
                             foreach=True)


def sgd(settings: OptimizerSettings) -> Any:
    """torch SGD; ``optim.sgd.momentum`` (0: none, no state) and ``optim.sgd.nesterov``."""
    import torch

    momentum, nesterov = float(settings.options["momentum"]), bool(settings.options["nesterov"])
    if nesterov and momentum == 0:
        raise UserError("optim.sgd.nesterov=true needs momentum: optim.sgd.momentum is 0.",
                        "Set optim.sgd.momentum above 0 (e.g. 0.9), or optim.sgd.nesterov=false.")
    return torch.optim.SGD(settings.param_groups(), lr=settings.lr, momentum=momentum, nesterov=nesterov,
                           foreach=True)


def adafactor(settings: OptimizerSettings) -> Any:
    """torch Adafactor: factored second moments (a row and a column vector per matrix), no first
    moment, so its state is a small fraction of AdamW's; parameters sharded over processes are
    updated by ``ShardedAdafactor``."""
    from automodel_cli.components.optim.sharded_adafactor import ShardedAdafactor

    options = settings.options
    return ShardedAdafactor(settings.param_groups(), lr=settings.lr, beta2_decay=float(options["beta2_decay"]),
                            eps=(None, float(options["eps"])), d=float(options["clip_threshold"]), foreach=True)


def adamw8bit(settings: OptimizerSettings) -> Any:
    """bitsandbytes' AdamW with 8-bit (block-quantised) moments: a quarter of AdamW's state.
    Its state is kept per process-local tensor, so it runs without sharded parameters only."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise UserError(
            f"optim.name=adamw8bit needs the bitsandbytes package, which is not installed ({exc}).",
            "Install it with `pip install 'automodel-cli[bnb]'` (or `pip install bitsandbytes`), or use "
            "optim.name=adamw.",
        ) from None
    if settings.sharded():
        raise UserError(
            "optim.name=adamw8bit keeps its 8-bit state per process-local tensor and cannot update parameters "
            "sharded over processes (FSDP, tensor parallelism).",
            "Run it on one process, or use optim.name=adamw (or adafactor, whose state is smaller still) with "
            "several processes.",
        )
    import torch

    optimizer = bitsandbytes.optim.AdamW8bit(settings.param_groups(), lr=settings.lr, betas=settings.betas,
                                             eps=settings.eps)
    # bitsandbytes nests its quantisation tensors in state_dict() (to hide them from FSDP1's
    # gather); the checkpoint's flattened keys would not bring them back. Unsharded, the plain
    # torch state_dict round-trips, and bitsandbytes' load_state_dict reads it.
    optimizer.state_dict = types.MethodType(torch.optim.Optimizer.state_dict, optimizer)
    return optimizer
