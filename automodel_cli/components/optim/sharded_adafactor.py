"""Adafactor for parameters sharded over processes (FSDP2, tensor parallelism).

torch's Adafactor cannot step DTensor parameters: its factored statistics (the mean of the
squared gradient over a matrix's rows and over its columns) come out of a norm as *partial*
DTensors, which its in-place ops refuse. The statistics are tiny, though -- one vector per
matrix side, and a full-size second moment only for vectors (norms, biases) -- so here every
process keeps them whole, as one process would: each DTensor gradient is gathered one matrix at
a time, the update is computed with torch's formulas on the whole matrix, and each process adds
its own shard of it. The optimizer state has the same names and shapes as torch's, so a
checkpoint written by N processes resumes on one and the reverse. Unsharded parameters take
torch's own step.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _whole(tensor: Any) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _shard_like(whole: torch.Tensor, param: Any) -> Any:
    """``whole`` laid out as ``param`` is (this process's shard of it, as a DTensor)."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(param, DTensor):
        return whole
    mesh = param.device_mesh
    replicated = DTensor.from_local(whole, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, param.placements)


class ShardedAdafactor(torch.optim.Adafactor):
    """``torch.optim.Adafactor`` that also steps DTensor parameters (see the module docstring)."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        from torch.distributed.tensor import DTensor

        if not any(isinstance(p, DTensor) for group in self.param_groups for p in group["params"]):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: Any, group: dict[str, Any]) -> None:
        """One parameter's step: torch's single-tensor Adafactor on the whole gradient."""
        grad = _whole(param.grad)
        if group["maximize"]:
            grad = -grad
        state = self.state[param]
        if not state:  # the state torch's Adafactor creates, for the whole parameter
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            if grad.dim() > 1:
                state["row_var"] = grad.new_zeros((*grad.shape[:-1], 1))
                state["col_var"] = grad.new_zeros((*grad.shape[:-2], 1, grad.shape[-1]))
            else:
                state["variance"] = torch.zeros_like(grad)
        lr, (eps1, eps2), decay = float(group["lr"]), group["eps"], group["weight_decay"]
        eps1 = torch.finfo(param.dtype).eps if eps1 is None else eps1
        state["step"] += 1
        step = state["step"].item()
        one_minus_beta2 = step ** group["beta2_decay"]
        rho = min(lr, 1 / step ** 0.5)
        # A sharded norm is partial on each process (.item() would read this shard's): reduce it first.
        alpha = max(eps2, _whole(param.norm(2)).item() / math.sqrt(param.numel())) * rho
        if decay != 0:
            param.mul_(1 - lr * decay)
        if grad.dim() > 1:
            row_var, col_var = state["row_var"], state["col_var"]
            row_var.lerp_(torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1)), one_minus_beta2)
            col_var.lerp_(torch.norm(grad, dim=-2, keepdim=True).square_().div_(grad.size(-2)), one_minus_beta2)
            estimate = (row_var @ col_var).div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
        else:
            state["variance"].lerp_(grad * grad, one_minus_beta2)
            estimate = state["variance"].clone()
        update = estimate.clamp_(min=eps1 * eps1).rsqrt_().mul_(grad)
        denom = max(1.0, update.norm(2).item() / (math.sqrt(update.numel()) * group["d"]))
        param.add_(_shard_like(update, param), alpha=-alpha / denom)
