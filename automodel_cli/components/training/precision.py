"""Device and precision policy for single-device training.

``model.dtype=auto``: on a GPU with bf16, full fine-tuning keeps fp32 master weights and runs the
forward pass under bf16 autocast (exact optimizer updates, bf16 speed); LoRA keeps the frozen
base in bf16 (half the memory) while peft keeps the small adapters in fp32. On CPU everything is
fp32: CPU bf16 matmuls are slower than fp32 on most machines.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any


@dataclass
class Precision:
    device: Any
    param_dtype: Any
    autocast_dtype: Any | None

    @classmethod
    def choose(cls, dtype_name: str, peft_method: str, device: Any, *, sharded: bool = False) -> Precision:
        """``sharded``: FSDP keeps one dtype for every parameter it shards, so the LoRA base stays
        fp32 there and FSDP's own mixed-precision policy computes in bf16."""
        import torch

        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        param, autocast = dtype_policy(dtype_name, peft_method, device.type, bf16=bf16, sharded=sharded)
        return cls(device, getattr(torch, param), getattr(torch, autocast) if autocast else None)

    def autocast(self) -> Any:
        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        params = str(self.param_dtype).replace("torch.", "")
        mixed = f", {str(self.autocast_dtype).replace('torch.', '')} autocast" if self.autocast_dtype else ""
        return f"{self.device.type}, {params} weights{mixed}"


def dtype_policy(dtype_name: str, peft_method: str, device_type: str, *, bf16: bool,
                 sharded: bool = False) -> tuple[str, str | None]:
    """(parameter dtype, autocast dtype or None) by name, without torch: the policy of the module
    docstring, which ``Precision.choose`` applies and the memory plan predicts. ``bf16``: the
    device computes in bf16 (a CUDA GPU that supports it)."""
    cuda = device_type == "cuda"
    if dtype_name == "auto":
        bf16 = bf16 and cuda
        lean_base = bf16 and peft_method != "none" and not sharded
        return ("bfloat16" if lean_base else "float32"), ("bfloat16" if bf16 else None)
    return dtype_name, (dtype_name if cuda and dtype_name != "float32" else None)
