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

        cuda = device.type == "cuda"
        bf16 = cuda and torch.cuda.is_bf16_supported()
        if dtype_name == "auto":
            autocast = torch.bfloat16 if bf16 else None
            lean_base = bf16 and peft_method != "none" and not sharded
            return cls(device, torch.bfloat16 if lean_base else torch.float32, autocast)
        param = getattr(torch, dtype_name)
        autocast = param if (cuda and param != torch.float32) else None
        return cls(device, param, autocast)

    def autocast(self) -> Any:
        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        params = str(self.param_dtype).replace("torch.", "")
        mixed = f", {str(self.autocast_dtype).replace('torch.', '')} autocast" if self.autocast_dtype else ""
        return f"{self.device.type}, {params} weights{mixed}"
