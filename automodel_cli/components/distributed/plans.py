"""Tensor-parallel (TP) plans for Hugging Face decoder-only architectures.

A plan is a function ``plan(model, tp_mesh, sequence_parallel) -> {module FQN: ParallelStyle}``
registered in the parallel-plan registry under a Hugging Face ``config.model_type`` (see
``automodel_cli/plugins/parallel_plans.py``; third-party plugins add architectures the same way).
FQNs are relative to the module ``parallelize_module`` receives (a plain HF model or a peft
wrapper): plans find the decoder stack by structure, so the same plan serves both.

The Megatron layout (as in torchtitan's ``parallelize_llama``):

* attention ``q/k/v_proj`` and MLP ``gate/up_proj`` are column-parallel (output features, i.e.
  heads / intermediate channels, sharded) and ``o_proj`` / ``down_proj`` row-parallel, so a
  decoder layer needs one all-reduce after attention and one after the MLP. Every rank holds
  ``num_heads / tp`` query heads and ``num_kv_heads / tp`` key/value heads: the HF attention
  code infers the local head count from the shapes (``view(..., -1, head_dim)``).
* per-head q/k norms (Qwen3, Gemma 3) act on ``head_dim`` only, so they are exact on a head
  shard; their weights are replicated and their gradients summed over the TP group
  (``ReplicateParallel(Shard(head_dim))``), because each rank only sees its own heads.
* every parameter the plan leaves alone (norms, LoRA A/B matrices, an unsharded vocabulary)
  becomes a Replicate DTensor too (``parallelize_model`` does this), so optimizers with
  ``foreach=True`` never mix plain tensors and DTensors.
* the input embedding is row-parallel (vocabulary sharded, output all-reduced) and ``lm_head``
  column-parallel with a gathered (replicated) output, so the loss sees full logits. With tied
  embeddings both hold the same Shard(0) weight; ``parallelize_model`` re-ties them. A
  vocabulary that ``tp`` does not divide stays replicated.
* Phi-3 fuses ``qkv_proj`` and ``gate_up_proj`` and slices the fused output by *global*
  offsets, so a naive column split would hand rank 0 all of q and rank 1 k and v. The plan
  keeps the fused weights sharded (memory and optimizer state split ``tp`` ways) but gathers
  their outputs, and the following ``o_proj`` / ``down_proj`` take their input slice locally
  (``input_layouts=Replicate()``): exact, with the same state-dict layout as the HF checkpoint,
  at the cost of one extra all-gather per projection and attention computed on all heads on
  every TP rank. (This is also how transformers' own Phi-3 TP plan handles it.)

Sequence parallelism (``sequence_parallel=True``) additionally shards the residual stream and
the norms along the sequence (Shard(1)) between the attention and MLP blocks: decoder-layer norms
become ``SequenceParallel``, the attention and MLP inputs are all-gathered, and ``o_proj`` /
``down_proj`` reduce-scatter instead of all-reduce. The embedding output stays replicated (HF
builds masks and positions from it) and the first decoder layer takes its own sequence shard.
The sequence length must then be divisible by ``tp`` (checked at run time).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from automodel_cli.components.models.structure import decoder_stack, num_experts, output_head, text_config
from automodel_cli.errors import UserError

# --------------------------------------------------------------------------- validation

def _field(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def _text(config: Any) -> Any:
    if isinstance(config, dict):
        return config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    return text_config(config)


def tp_sizes(config: Any) -> dict[str, Any]:
    """The sizes ``distributed.tp`` must divide: attention and key/value heads, and the MLP width
    where the plan shards the MLP (a mixture-of-experts model's experts and router stay
    replicated, so only its dense MLP layers, if any, are sharded)."""
    cfg = _text(config)
    heads = _field(cfg, "num_attention_heads")
    sizes = {"num_attention_heads": heads, "num_key_value_heads": _field(cfg, "num_key_value_heads") or heads}
    dense_layers = bool(_field(cfg, "mlp_only_layers")) or (_field(cfg, "decoder_sparse_step") or 1) > 1
    if num_experts(cfg) is None or dense_layers:
        sizes["intermediate_size"] = _field(cfg, "intermediate_size")
    return sizes


def tp_problems(config: Any, tp: int) -> list[str]:
    """``name=value`` for each size of ``tp_sizes`` that ``tp`` does not divide."""
    return [f"{name}={value}" for name, value in tp_sizes(config).items() if isinstance(value, int) and value % tp]


def validate_tp(config: Any, tp: int) -> None:
    """``tp`` must divide the attention heads, the key/value heads and the MLP width (``tp_sizes``)."""
    if tp == 1:
        return
    if not isinstance(tp, int) or tp < 1:
        raise UserError(f"distributed.tp={tp} must be a positive integer.")
    problems = tp_problems(config, tp)
    if problems:
        model_type = _field(config, "model_type") or "?"
        sizes = tp_sizes(config)
        raise UserError(
            f"distributed.tp={tp} must divide the model's {', '.join(problems)} "
            f"({model_type}: {', '.join(f'{k}={v}' for k, v in sizes.items())}).",
            f"Choose tp from {tp_divisors(config)} (and give the rest of the processes to dp_shard).",
        )


def tp_divisors(config: Any) -> list[int]:
    return _common_divisors([v for v in tp_sizes(config).values() if isinstance(v, int)])


def _common_divisors(values: list[int]) -> list[int]:
    import math

    g = 0
    for value in values:
        g = math.gcd(g, value)
    return [d for d in range(1, (g or 1) + 1) if g % d == 0] if g else [1]


def resolve_plan(plan_registry: Any, model_type: str, tp: int) -> Callable[..., dict[str, Any]]:
    """The registered plan function for ``model_type``, or a ``UserError`` listing the types
    that have one (registered by built-in or third-party plugins)."""
    if plan_registry is None or model_type not in plan_registry:
        names = plan_registry.names() if plan_registry is not None else []
        raise UserError(
            f"distributed.tp={tp} needs a tensor-parallel plan, and none is registered for model "
            f"type `{model_type}`. Plans exist for: {', '.join(names) or 'none'}.",
            "Use distributed.tp=1 (FSDP/HSDP work for every model), or install a plugin that "
            "registers a plan for this architecture (hook register_parallel_plans; "
            "`automodel list parallel-plans` shows what is installed).",
        )
    return plan_registry.get(model_type).load()


# --------------------------------------------------------------------------- custom styles

def _placements():
    from torch.distributed.tensor import Replicate, Shard

    return Replicate, Shard


def _make_styles():
    """Custom ``ParallelStyle`` classes, built lazily so importing this module needs no torch."""
    import torch
    from torch.distributed.tensor import DTensor, Replicate, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import ParallelStyle

    def _convert(x: Any, mesh: Any, src: Any, dst: Any, local: bool) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, (src,), run_check=False)
        if tuple(x.placements) != (dst,):
            x = x.redistribute(placements=(dst,))
        return x.to_local() if local else x

    class PrepareHiddenStates(ParallelStyle):
        """Re-lay-out a module's ``hidden_states`` input (first positional argument or the
        ``hidden_states`` keyword, whichever HF uses) from ``src`` to ``dst`` placement."""

        def __init__(self, src: Any, dst: Any, use_local_output: bool = True) -> None:
            self.src, self.dst, self.use_local_output = src, dst, use_local_output

        def _apply(self, module: Any, device_mesh: Any) -> Any:
            def hook(mod: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                if args:
                    args = (_convert(args[0], device_mesh, self.src, self.dst, self.use_local_output),
                            *args[1:])
                elif "hidden_states" in kwargs:
                    kwargs = dict(kwargs)
                    kwargs["hidden_states"] = _convert(kwargs["hidden_states"], device_mesh,
                                                       self.src, self.dst, self.use_local_output)
                return args, kwargs

            module.register_forward_pre_hook(hook, with_kwargs=True)
            return module

        def __repr__(self) -> str:
            return f"PrepareHiddenStates({self.src} -> {self.dst})"

    class ReplicateParallel(ParallelStyle):
        """Keep the module's own parameters whole on every TP rank (Replicate DTensors) and read
        its first input as a DTensor with ``input_layout``; the output (or each tensor of a tuple
        output) is returned as a local tensor. With a sharded input (``Shard(d)``: the local heads for per-head q/k norms, the
        local sequence chunk for LoRA B under sequence parallelism) DTensor sums the parameter
        gradients over the TP group; with ``Replicate()`` it only makes the parameter a DTensor
        (so optimizers see one kind of tensor) and needs no communication."""

        def __init__(self, input_layout: Any) -> None:
            self.input_layout = input_layout

        def _apply(self, module: Any, device_mesh: Any) -> Any:
            layout = self.input_layout

            def partition_fn(name: str, mod: Any, mesh: Any) -> None:
                if mod is not module:
                    return
                for param_name, param in list(mod.named_parameters(recurse=False)):
                    if isinstance(param, DTensor):
                        continue
                    replicated = distribute_tensor(param.data, mesh, [Replicate()])
                    mod.register_parameter(
                        param_name, torch.nn.Parameter(replicated, requires_grad=param.requires_grad))

            def input_fn(mod: Any, inputs: Any, mesh: Any) -> Any:
                if not isinstance(inputs, tuple):
                    inputs = (inputs,)
                if not inputs:
                    return inputs
                first = inputs[0]
                if isinstance(first, torch.Tensor) and not isinstance(first, DTensor):
                    first = DTensor.from_local(first, mesh, (layout,), run_check=False)
                return (first, *inputs[1:])

            def output_fn(mod: Any, outputs: Any, mesh: Any) -> Any:
                # A tuple too (a mixture of experts' router returns logits, weights and indices).
                if isinstance(outputs, tuple):
                    return tuple(o.to_local() if isinstance(o, DTensor) else o for o in outputs)
                return outputs.to_local() if isinstance(outputs, DTensor) else outputs

            return distribute_module(module, device_mesh, partition_fn, input_fn, output_fn)

        def __repr__(self) -> str:
            return f"ReplicateParallel(input_layout={self.input_layout})"

    return PrepareHiddenStates, ReplicateParallel


_STYLES: tuple[type, type] | None = None


def PrepareHiddenStates(src: Any, dst: Any, use_local_output: bool = True) -> Any:  # noqa: N802
    global _STYLES
    _STYLES = _STYLES or _make_styles()
    return _STYLES[0](src, dst, use_local_output)


def ReplicateParallel(input_layout: Any) -> Any:  # noqa: N802
    global _STYLES
    _STYLES = _STYLES or _make_styles()
    return _STYLES[1](input_layout)


# --------------------------------------------------------------------------- plan builders

def _is_norm(module: Any) -> bool:
    name = type(module).__name__
    return name.endswith("RMSNorm") or name.endswith("LayerNorm") or name == "LayerNorm"


def decoder_plan(
    model: Any,
    tp_mesh: Any,
    sequence_parallel: bool = False,
    *,
    qk_norm_head_dim: int | None = None,
    fused_qkv: bool = False,
) -> dict[str, Any]:
    """The plan shared by the built-in architectures (see the module docstring).

    ``qk_norm_head_dim``: the dimension of the heads in the tensor ``q_norm``/``k_norm`` receive
    (2 for ``[b, s, heads, d]`` as in Qwen3, 1 for ``[b, heads, s, d]`` as in Gemma 3), or None
    without q/k norms. ``fused_qkv``: Phi-3 style ``qkv_proj`` + ``gate_up_proj``.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    Replicate, Shard = _placements()
    tp = tp_mesh.size()
    sp = bool(sequence_parallel)
    residual = Shard(1) if sp else Replicate()
    prefix, stack = decoder_stack(model)
    plan: dict[str, Any] = {}

    embed = stack.embed_tokens
    vocab = getattr(embed, "num_embeddings", None)
    _, head_name = output_head(model)
    shard_vocab = isinstance(vocab, int) and vocab % tp == 0
    if shard_vocab:
        plan[f"{prefix}embed_tokens"] = RowwiseParallel(input_layouts=Replicate(),
                                                        output_layouts=Replicate())
    if sp:
        plan[f"{prefix}layers.0"] = PrepareHiddenStates(Replicate(), Shard(1))
        if getattr(stack, "norm", None) is not None:
            plan[f"{prefix}norm"] = SequenceParallel(use_local_output=True)
    if head_name and shard_vocab:
        plan[head_name] = ColwiseParallel(input_layouts=residual, output_layouts=Replicate(),
                                          use_local_output=True)
    elif head_name and sp:
        # A replicated lm_head needs the whole sequence back.
        plan[head_name] = PrepareHiddenStates(Shard(1), Replicate())

    for i, layer in enumerate(stack.layers):
        p = f"{prefix}layers.{i}."
        if sp:
            for child_name, child in layer.named_children():
                if _is_norm(child):
                    plan[p + child_name] = SequenceParallel(use_local_output=True)
            plan[p + "self_attn"] = PrepareHiddenStates(Shard(1), Replicate())
            plan[p + "mlp"] = PrepareHiddenStates(Shard(1), Replicate())
        if fused_qkv:
            plan[p + "self_attn.qkv_proj"] = ColwiseParallel(output_layouts=Replicate())
            plan[p + "self_attn.o_proj"] = RowwiseParallel(input_layouts=Replicate(),
                                                           output_layouts=residual)
            plan[p + "mlp.gate_up_proj"] = ColwiseParallel(output_layouts=Replicate())
            plan[p + "mlp.down_proj"] = RowwiseParallel(input_layouts=Replicate(),
                                                        output_layouts=residual)
            continue
        for name in ("q_proj", "k_proj", "v_proj"):
            plan[p + f"self_attn.{name}"] = ColwiseParallel()
        plan[p + "self_attn.o_proj"] = RowwiseParallel(output_layouts=residual)
        if qk_norm_head_dim is not None:
            for name in ("q_norm", "k_norm"):
                if getattr(layer.self_attn, name, None) is not None:
                    plan[p + f"self_attn.{name}"] = ReplicateParallel(Shard(qk_norm_head_dim))
        plan[p + "mlp.gate_proj"] = ColwiseParallel()
        plan[p + "mlp.up_proj"] = ColwiseParallel()
        plan[p + "mlp.down_proj"] = RowwiseParallel(output_layouts=residual)
    return plan


def llama_plan(model: Any, tp_mesh: Any, sequence_parallel: bool = False) -> dict[str, Any]:
    """Llama, Mistral, Qwen2 (q/k/v biases are sharded with their weights), Gemma 2."""
    return decoder_plan(model, tp_mesh, sequence_parallel)


def qwen3_plan(model: Any, tp_mesh: Any, sequence_parallel: bool = False) -> dict[str, Any]:
    """Qwen3: per-head q/k RMSNorm on ``[b, s, heads, head_dim]``."""
    return decoder_plan(model, tp_mesh, sequence_parallel, qk_norm_head_dim=2)


def gemma3_plan(model: Any, tp_mesh: Any, sequence_parallel: bool = False) -> dict[str, Any]:
    """Gemma 3 (text, or the language model of the multimodal one; the vision tower stays
    replicated): per-head q/k RMSNorm on ``[b, heads, s, head_dim]``."""
    return decoder_plan(model, tp_mesh, sequence_parallel, qk_norm_head_dim=1)


def phi3_plan(model: Any, tp_mesh: Any, sequence_parallel: bool = False) -> dict[str, Any]:
    """Phi-3 / Phi-4-mini: fused ``qkv_proj`` and ``gate_up_proj`` (gathered, see module doc)."""
    return decoder_plan(model, tp_mesh, sequence_parallel, fused_qkv=True)


def moe_plan(model: Any, tp_mesh: Any, sequence_parallel: bool = False, *,
             qk_norm_head_dim: int | None = None) -> dict[str, Any]:
    """Mixture-of-experts decoders (Qwen2-MoE, Qwen3-MoE, Mixtral): attention as the dense
    family's plan; each sparse MoE block (router, experts, shared experts) is left out of the
    plan, so its parameters are replicated on every TP rank and it computes the whole block on
    the (replicated) hidden states: exact, and the experts are never named (expert parallelism
    shards them, not TP). A dense MLP layer between sparse ones is sharded as usual. Sequence
    parallelism is not supported here (the replicated block's output is not sequence-sharded)."""
    if sequence_parallel:
        raise UserError("distributed.sequence_parallel=true is not supported with tensor parallelism on a "
                        "mixture-of-experts model.", "Set distributed.sequence_parallel=false.")
    plan = decoder_plan(model, tp_mesh, False, qk_norm_head_dim=qk_norm_head_dim)
    prefix, stack = decoder_stack(model)
    for i, layer in enumerate(stack.layers):
        if getattr(getattr(layer, "mlp", None), "experts", None) is not None:
            for name in ("gate_proj", "up_proj", "down_proj"):
                plan.pop(f"{prefix}layers.{i}.mlp.{name}", None)
    return plan


def qwen3_moe_plan(model: Any, tp_mesh: Any, sequence_parallel: bool = False) -> dict[str, Any]:
    """Qwen3-MoE: ``moe_plan`` with Qwen3's per-head q/k norms."""
    return moe_plan(model, tp_mesh, sequence_parallel, qk_norm_head_dim=2)


def mixtral_plan(model: Any, tp_mesh: Any, sequence_parallel: bool = False) -> dict[str, Any]:
    """Mixtral, Qwen2-MoE: ``moe_plan`` (no q/k norms)."""
    return moe_plan(model, tp_mesh, sequence_parallel)
