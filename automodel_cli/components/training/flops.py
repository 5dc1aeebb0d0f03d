"""Training FLOPs per token, achieved TFLOP/s, model FLOPs utilisation (MFU) and peak memory.

The count (docs/benchmark.md works an example) is the usual model-FLOPs convention of PaLM
(Chowdhery et al. 2022, appendix B), Megatron-LM and torchtitan, so MFU numbers compare with
published ones::

    flops_per_token = 6 * N_matmul + 12 * L * n_heads * d_head * S

- ``6 * N_matmul``: every weight matrix a token passes through costs 2 FLOPs per weight in the
  forward pass (one multiply-add) and 4 in the backward pass (gradients of the input and of the
  weight). ``N_matmul`` counts the weights of every ``nn.Linear`` of the model: the attention
  and MLP projections of each decoder layer and the LM head (counted even when it is tied to
  the input embedding, since it is still a matmul); the embedding lookup, norms and biases are
  not matmuls and are left out. For Llama/Qwen/Mistral/Gemma/Phi-3-style blocks (gated MLP,
  grouped-query attention) this is
  ``N_matmul = L * (h * d_head * (2 * n_heads + 2 * n_kv_heads) + 3 * h * i) + h * V``.
- ``12 * L * n_heads * d_head * S``: the attention scores ``Q K^T`` and the weighted sum
  ``A V`` each cost ``2 * n_heads * d_head * S`` FLOPs per token and layer in the forward pass,
  times 3 for training, over the full ``S x S`` square (not halved for the causal mask,
  following PaLM; sliding-window layers are counted like full ones).

Mixture-of-experts models count what one token actually passes through: the expert weights
(stacked ``[experts, ...]`` tensors in transformers 5, not ``nn.Linear`` modules) of
``num_experts_per_tok`` experts per layer, plus the router (``h x experts``), on top of the
``nn.Linear`` weights (attention, shared experts, LM head). This is the "active parameters"
convention of the MoE papers (Mixtral's 13B of 47B, Qwen3-30B-A3B's 3B), so MFU compares with
theirs; ``note`` says the count is of active experts.

Recomputation (activation checkpointing) is not counted: this is model FLOPs, not hardware
FLOPs.

Peaks are dense (no sparsity) bf16 tensor-core TFLOP/s per device from the vendors' data
sheets, matched against ``torch.cuda.get_device_name()``; ``train.peak_tflops`` overrides
the table. CPUs have no entry, so their MFU is None ("n/a") unless a peak is given.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from automodel_cli.components.models.structure import experts_per_token, text_config

#: (regular expression on the device name, label, dense bf16 TFLOP/s). First match wins, so
#: specific names come before the names they contain (GH200 before H200, L40S before L40).
PEAK_BF16_TFLOPS: list[tuple[str, str, float]] = [
    (r"\bGB200\b", "NVIDIA GB200", 2500.0),
    (r"\bB200\b", "NVIDIA B200", 2250.0),
    (r"\bB100\b", "NVIDIA B100", 1750.0),
    (r"\bGH200\b", "NVIDIA GH200", 989.4),
    (r"\bH200 NVL\b", "NVIDIA H200 NVL", 835.5),
    (r"\bH200\b", "NVIDIA H200 SXM", 989.4),
    (r"\bH100 NVL\b", "NVIDIA H100 NVL", 835.5),
    (r"\bH100 PCIe\b", "NVIDIA H100 PCIe", 756.5),
    (r"\bH100\b", "NVIDIA H100 SXM", 989.4),
    (r"\bH800\b", "NVIDIA H800 SXM", 989.4),
    (r"\bH20\b", "NVIDIA H20", 148.0),
    (r"\bA100\b", "NVIDIA A100", 312.0),
    (r"\bA800\b", "NVIDIA A800", 312.0),
    (r"\bL40S\b", "NVIDIA L40S", 362.05),
    (r"\bL40\b", "NVIDIA L40", 181.05),
    (r"\bL4\b", "NVIDIA L4", 121.0),
    (r"\bA10\b", "NVIDIA A10", 125.0),
    (r"\bMI325X\b", "AMD MI325X", 1307.4),
    (r"\bMI300X\b", "AMD MI300X", 1307.4),
    (r"\bMI250X\b", "AMD MI250X", 383.0),
]


@dataclass(frozen=True)
class FlopsPerToken:
    """The two terms of the formula for one model and sequence length."""

    matmul_parameters: int
    dense: int  # 6 * matmul_parameters
    attention: int  # 12 * L * n_heads * d_head * S
    seq_len: int
    note: str | None = None

    @property
    def total(self) -> int:
        return self.dense + self.attention

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


def matmul_parameters(model: Any) -> int:
    """Weights of every ``nn.Linear`` (per use: a tied LM head counts although the embedding
    shares its tensor). Take the count before the model is sharded or wrapped."""
    import torch

    return sum(module.weight.numel() for module in model.modules()
               if isinstance(module, torch.nn.Linear))


def active_expert_parameters(model: Any, top_k: int) -> int:
    """Expert and router weights one token multiplies by: in every experts module (a module with
    ``num_experts`` and parameters stacked ``[num_experts, ...]``) the matrices of ``top_k``
    experts (biases and other vectors left out, as for ``nn.Linear``); in every router (a module
    with a ``[num_experts, hidden]`` ``weight`` that is not an ``nn.Linear``) its whole weight."""
    import torch

    total = 0
    for module in model.modules():
        experts = getattr(module, "num_experts", None)
        if not isinstance(experts, int) or isinstance(module, torch.nn.Linear):
            continue
        own = list(module.parameters(recurse=False))
        stacked = [p for p in own if p.ndim == 3 and p.shape[0] == experts]
        if stacked:
            total += sum(p.numel() for p in stacked) // experts * top_k
        elif any(p.ndim == 2 and p.shape[0] == experts for p in own):  # a router
            total += sum(p.numel() for p in own if p.ndim == 2)
    return total


def attention_shape(config: Any) -> tuple[int, int, int]:
    """(layers, query heads, head dim) of a Hugging Face text config."""
    config = text_config(config)
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, heads, int(head_dim)


def flops_per_token(model: Any, config: Any, seq_len: int) -> FlopsPerToken:
    """Training FLOPs per token of ``model`` on sequences of ``seq_len`` tokens."""
    n = matmul_parameters(model)
    layers, heads, head_dim = attention_shape(config)
    top_k = experts_per_token(config)
    note = None
    if top_k:
        n += active_expert_parameters(model, top_k)
        note = f"mixture of experts: the weights of the {top_k} experts a token is routed to, and the routers"
    return FlopsPerToken(n, 6 * n, 12 * layers * heads * head_dim * seq_len, seq_len, note)


def device_name(device: Any) -> str:
    import platform

    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_tflops(device: Any, override: float | None = None) -> tuple[float | None, str | None]:
    """(peak dense bf16 TFLOP/s of one device, where the number comes from), or (None, None)."""
    if override is not None:
        return float(override), "train.peak_tflops"
    if getattr(device, "type", str(device)) != "cuda":
        return None, None
    return lookup_peak(device_name(device))


def lookup_peak(name: str) -> tuple[float | None, str | None]:
    for pattern, label, value in PEAK_BF16_TFLOPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return value, f"table: {label} bf16 dense"
    return None, None


def achieved(flops: float, seconds: float, devices: int, peak: float | None) -> tuple[float, float | None]:
    """(TFLOP/s per device, MFU as a fraction or None) for ``flops`` done by ``devices`` in
    ``seconds``."""
    tflops = flops / max(seconds, 1e-12) / max(devices, 1) / 1e12
    return tflops, (tflops / peak if peak else None)


def step_time_stats(times: list[float]) -> dict[str, float]:
    """mean, p50, p90, min and max of step times in seconds (percentiles interpolated)."""
    ordered = sorted(times)
    if len(ordered) == 1:
        p50 = p90 = ordered[0]
    else:
        cuts = statistics.quantiles(ordered, n=10, method="inclusive")
        p50, p90 = statistics.median(ordered), cuts[8]
    return {"mean": statistics.fmean(ordered), "p50": p50, "p90": p90,
            "min": ordered[0], "max": ordered[-1]}


def reset_peak_memory(device: Any) -> None:
    import torch

    if getattr(device, "type", None) == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: Any) -> tuple[int, str]:
    """(bytes, what was measured): CUDA ``max_memory_allocated`` on a GPU (since the last
    ``reset_peak_memory``), else the peak resident set size of this process."""
    import sys

    import torch

    if getattr(device, "type", None) == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024), "process_peak_rss"
