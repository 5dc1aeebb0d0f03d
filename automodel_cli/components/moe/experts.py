"""Expert blocks of mixture-of-experts models: what they are (kinds), how their tokens are computed
(grouped GEMM or a per-expert loop) and the forward automodel installs on each of them.

A mixture-of-experts layer routes every token to ``top_k`` of ``E`` experts. Hugging Face's
experts modules (every class decorated with ``use_experts_implementation``: Qwen2/3-MoE, Mixtral,
OLMoE, GPT-OSS, DeepSeek, ...) hold each weight of all experts as one tensor whose dimension 0 is
the expert, and are called as ``experts(hidden [T, H], top_k_index [T, K], top_k_weights [T, K])``.
automodel replaces that forward at build time (``install_experts``) with one that

1. sorts the ``T * K`` (token, expert) pairs by expert, so each expert's tokens are one block;
2. computes every block with its expert's weights: ``ExpertKind.compute`` on this process's
   experts, in one grouped GEMM (``torch.nn.functional.grouped_mm``) or a loop over experts;
   under expert parallelism (``distributed.ep``) the blocks first travel to the process owning
   their expert and back (``components/moe/dispatch.py``);
3. weights each result by its routing weight and sums a token's ``K`` results.

No token is dropped and nothing is approximated: the result is the eager loop's up to float
rounding. The weights are read through ``local()`` so they may be ``DTensor`` shards (expert
parallelism: ``Shard(0)`` on the ep mesh; tensor parallelism: ``Replicate`` on the tp mesh).

A kind is how automodel recognises and computes one class of experts module; the built-in one
covers Hugging Face's fused experts (gated or not, with biases, transposed, interleaved gate/up
through the module's own ``_apply_gate``). A plugin adds others with the ``register_moe_blocks``
hook.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from automodel_cli.errors import UserError

#: ``model.experts_kernel`` values: auto takes grouped GEMM wherever it runs.
KERNELS = ("auto", "grouped_mm", "loop")


@dataclass(frozen=True)
class ExpertKind:
    """One class of experts module: how to recognise it, which of its parameters hold one slice
    per expert (dimension 0: those are what expert parallelism shards), and how to compute tokens
    already grouped by expert.

    ``compute(module, weights, x, offsets)``: ``weights`` maps each name of ``parameters(module)``
    to the tensor of this process's experts (``[L, ...]``, local), ``x [S, H]`` holds the tokens
    of expert 0, then of expert 1, ..., and ``offsets [L]`` (int32) is the running total of the
    tokens per expert (``offsets[-1] == S``; an expert may have none). It returns ``[S, H]``: each
    row through its expert, not yet weighted by the router. ``grouped_linear`` does the matrix
    products with the run's kernel."""

    name: str
    matches: Callable[[Any], bool]
    parameters: Callable[[Any], tuple[str, ...]]
    compute: Callable[[Any, dict[str, Any], Any, Any], Any]
    description: str = ""


# ------------------------------------------------------------------------------ kernels
def grouped_mm_function() -> Callable[..., Any] | None:
    """``torch.nn.functional.grouped_mm`` (torch >= 2.10), else ``torch._grouped_mm``, else None."""
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _torch_version() -> tuple[int, int]:
    return tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])  # type: ignore[return-value]


def grouped_mm_available(device: Any, dtype: Any) -> bool:
    """Whether the grouped GEMM runs for weights of ``dtype`` on ``device``: on CPU from torch 2.9
    (any float dtype), on CUDA for bfloat16 on compute capability 8.0 or newer; elsewhere not."""
    if grouped_mm_function() is None:
        return False
    device = torch.device(device)
    if device.type == "cpu":
        return _torch_version() >= (2, 9)
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    return False


def _aligned(x: Any, weight: Any) -> bool:
    """The grouped GEMM reads 16-byte aligned rows: CPU kernels before torch 2.11 need aligned
    pointers (a memory-mapped checkpoint may give others), CUDA needs each row's bytes to be a
    multiple of 16."""
    size = x.element_size()
    if x.device.type == "cuda":
        return (x.shape[-1] * size) % 16 == 0 and (weight.shape[-1] * size) % 16 == 0
    if _torch_version() <= (2, 10):
        return x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0
    return True


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: the grouped GEMM's backward
    refuses a strided gradient (an expanded one from a sum, for instance)."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor) -> torch.Tensor:
        return value.view_as(value)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def grouped_linear(x: Any, weight: Any, offsets: Any, kernel: str, *, transposed: bool = False) -> Any:
    """``x [S, in]`` (rows grouped by expert as ``offsets`` says) times each expert's matrix:
    ``weight [L, out, in]`` as ``nn.Linear`` stores it, or ``[L, in, out]`` when ``transposed``.
    ``kernel`` is ``grouped_mm`` or ``loop`` (the grouped GEMM falls back to the loop for inputs
    it cannot take: unaligned rows, or no rows at all)."""
    matrices = weight if transposed else weight.transpose(-2, -1)  # [L, in, out]
    if x.shape[0] == 0:  # keeps the graph (zero gradients) without calling a kernel on no rows
        return x @ matrices[0]
    function = grouped_mm_function() if kernel == "grouped_mm" else None
    if function is not None and _aligned(x, matrices):
        out = function(x.to(matrices.dtype), matrices, offs=offsets)
        return _ContiguousGrad.apply(out)
    blocks, start = [], 0
    for index, end in enumerate(offsets.tolist()):
        if end > start:
            blocks.append(x[start:end] @ matrices[index])
        start = end
    return torch.cat(blocks) if blocks else x @ matrices[0]


def rows_expert(offsets: Any) -> Any:
    """The (local) expert of every grouped row: ``[0, 0, 1, 2, 2, ...]`` from ``offsets``."""
    counts = torch.diff(offsets.long(), prepend=offsets.new_zeros(1).long())
    return torch.repeat_interleave(torch.arange(len(counts), device=offsets.device), counts)


# ----------------------------------------------------------------- Hugging Face experts
def _is_hf_fused(module: Any) -> bool:
    down = getattr(module, "down_proj", None)
    return (all(hasattr(module, flag) for flag in ("has_gate", "has_bias", "is_transposed"))
            and isinstance(down, torch.nn.Parameter) and down.dim() == 3)


def _hf_fused_parameters(module: Any) -> tuple[str, ...]:
    names = ("gate_up_proj" if module.has_gate else "up_proj", "down_proj")
    if module.has_bias:
        names += tuple(f"{name}_bias" for name in names)
    return names


def _hf_fused_compute(module: Any, weights: dict[str, Any], x: Any, offsets: Any) -> Any:
    kernel = expert_state(module).kernel
    transposed = module.is_transposed
    first = "gate_up_proj" if module.has_gate else "up_proj"
    experts = rows_expert(offsets) if module.has_bias else None
    hidden = grouped_linear(x, weights[first], offsets, kernel, transposed=transposed)
    if module.has_bias:
        hidden = hidden + weights[f"{first}_bias"][experts]
    hidden = module._apply_gate(hidden) if module.has_gate else module.act_fn(hidden)
    out = grouped_linear(hidden, weights["down_proj"], offsets, kernel, transposed=transposed)
    if module.has_bias:
        out = out + weights["down_proj_bias"][experts]
    if getattr(module, "has_post_expert_norm", False):
        out = module.post_expert_norm(out)
    return out


HF_FUSED = ExpertKind(
    name="hf-fused",
    matches=_is_hf_fused,
    parameters=_hf_fused_parameters,
    compute=_hf_fused_compute,
    description="Hugging Face fused experts (use_experts_implementation: Qwen-MoE, Mixtral, OLMoE, GPT-OSS, "
                "DeepSeek, ...): gated or not, biases, transposed, interleaved gate/up.",
)


# ------------------------------------------------------------------ the installed forward
@dataclass
class ExpertState:
    """What the installed forward of one experts module needs: its kind, the kernel, and under
    expert parallelism the group its experts are split over (``dispatch.ExpertGroup``)."""

    kind: ExpertKind
    kernel: str
    num_experts: int
    ep: Any = None
    names: tuple[str, ...] = field(default_factory=tuple)


_STATE = "_automodel_experts"


def expert_state(module: Any) -> ExpertState:
    return getattr(module, _STATE)


def local(tensor: Any) -> Any:
    """The part of ``tensor`` this process holds: a ``DTensor``'s local tensor, else itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def experts_forward(module: Any, hidden_states: Any, top_k_index: Any, top_k_weights: Any) -> Any:
    """The forward installed on every experts module (see the module docstring). Under tensor
    parallelism the module is replicated and its input arrives as a replicated ``DTensor``: the
    computation runs on the local tensors (the same on every tensor-parallel rank)."""
    state = expert_state(module)
    hidden_states, top_k_index, top_k_weights = (local(t) for t in (hidden_states, top_k_index, top_k_weights))
    tokens, top_k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    grouped = hidden_states[order // top_k]
    counts = torch.bincount(flat, minlength=state.num_experts)
    weights = {name: local(getattr(module, name)) for name in state.names}

    def compute(x: Any, offsets: Any) -> Any:
        return state.kind.compute(module, weights, x, offsets)

    if state.ep is None:
        out = compute(grouped, torch.cumsum(counts, 0, dtype=torch.int32))
    else:  # dispatch.ExpertGroup: the rows travel to their experts' processes and back
        out = state.ep.run(grouped, counts, compute)
    out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
    unsorted = torch.empty_like(out).index_copy(0, order, out)
    return unsorted.view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


def choose_kernel(setting: str, device: Any, dtype: Any) -> str:
    """``model.experts_kernel`` for weights of ``dtype`` on ``device``: auto is ``grouped_mm``
    where it runs, else ``loop``; ``grouped_mm`` where it cannot run is a ``UserError``."""
    if setting not in KERNELS:
        raise UserError(f"model.experts_kernel={setting!r} is not one of {', '.join(KERNELS)}.",
                        "Use auto (grouped GEMM where it runs), grouped_mm or loop.")
    available = grouped_mm_available(device, dtype)
    if setting == "grouped_mm" and not available:
        raise UserError(
            f"model.experts_kernel=grouped_mm: the grouped GEMM does not run for {dtype} weights on {device} "
            f"(it needs torch >= 2.9 on CPU, or bfloat16 on a CUDA GPU of compute capability 8.0 or newer).",
            "Set model.experts_kernel=auto (the per-expert loop where the grouped GEMM cannot run) or loop.")
    if setting == "auto":
        return "grouped_mm" if available else "loop"
    return setting


def find_kind(module: Any, kinds: list[ExpertKind]) -> ExpertKind | None:
    return next((kind for kind in kinds if kind.matches(module)), None)


def install_experts(model: Any, kinds: list[ExpertKind], setting: str = "auto", *, device: Any = None,
                    dtype: Any = None) -> list[Any]:
    """Install ``experts_forward`` on every module of ``model`` that one of ``kinds`` matches
    (the first that does), with the kernel ``model.experts_kernel=setting`` picks for ``device``
    and ``dtype`` (the model's own when not given); returns the modules (none: not a MoE)."""
    installed = []
    kernel = None
    for module in model.modules():
        kind = find_kind(module, kinds)
        if kind is None:
            continue
        names = tuple(kind.parameters(module))
        first = getattr(module, names[0])
        if kernel is None:
            kernel = choose_kernel(setting, device if device is not None else first.device,
                                   dtype if dtype is not None else first.dtype)
        count = getattr(module, "num_experts", None) or first.shape[0]
        setattr(module, _STATE, ExpertState(kind, kernel, int(count), names=names))
        module.forward = types.MethodType(experts_forward, module)
        installed.append(module)
    return installed


def experts_modules(model: Any) -> list[Any]:
    """The modules ``install_experts`` prepared, in module order."""
    return [module for module in model.modules() if hasattr(module, _STATE)]


def moe_kinds(registry: Any) -> list[ExpertKind]:
    """The registered kinds in the order they are tried: plugins' first (so a plugin can claim a
    module a built-in kind would also match), then the built-in ones."""
    entries = sorted(registry, key=lambda entry: entry.provider.builtin)
    kinds = []
    for entry in entries:
        kind = entry.load()
        if not isinstance(kind, ExpertKind):
            raise UserError(
                f"MoE block `{entry.name}` from {entry.provider} is a {type(kind).__name__}, not an "
                f"automodel_cli.components.moe.experts.ExpertKind.",
                "Report the problem to the plugin's authors.")
        kinds.append(kind)
    return kinds
