"""Apply tensor parallelism, activation checkpointing and FSDP2/HSDP to a model.

Order (as torchtitan's ``parallelize_llama``): expert parallelism first (``ep > 1``: every
experts module's expert-stacked parameters become ``Shard(0)`` DTensors on the "ep" mesh and FSDP
leaves them alone), the TP plan next (parameters become DTensors on
the ``tp`` mesh), then activation checkpointing per decoder layer, then ``fully_shard`` per
decoder layer and on the root over the data-parallel mesh (2-D for HSDP), which turns every
parameter into a DTensor on ``(dp..., tp)``. Works for plain Hugging Face models and for peft
LoRA wrappers (decoder layers are found through the wrapper; frozen base weights and trainable
adapters share FSDP units, which FSDP2 allows).

Gradient reduction (the contract with the recipe)
-------------------------------------------------
FSDP2 averages gradients over the data-parallel ranks by default. We **sum** instead:
``parallelize_model`` sets ``set_gradient_divide_factor(1.0)`` and
``set_force_sum_reduction_for_comms(True)`` on every FSDP module (plain SUM reduce-scatter /
all-reduce, which gloo and NCCL both support). The recipe therefore computes, on each
data-parallel rank, ``loss = sum(token CE of its micro-batch) / (label tokens of the whole
global step over all dp ranks)`` and adds the micro-batches' gradients; the summed gradient is
then exactly the single-process gradient of the global batch, whatever the dp size, micro-batch
size or how unevenly label tokens fall on ranks. Tensor-parallel peers see the same data and
compute the same loss; DTensor makes their gradients exact without any scaling.

What the recipe does (see ``tests/components/distributed/_dist_worker.py`` for a runnable loop):

1. ``env = init_distributed()``; ``shape = MeshShape.resolve(..., world_size=env.world_size)``;
   ``mesh = build_mesh(shape, env.device.type)``; seed identically on every rank.
2. Load the model (same weights on every rank), apply peft, ``model.train()``, then
   ``parallelize_model``; build the optimizer *afterwards* (parameters are replaced by DTensors).
3. Each step: the global batch's samples are cut into ``dp_world_size(mesh)`` equal shares and
   this rank takes share ``dp_rank(mesh)`` (tp peers take the same share), in micro-batches
   (``accumulation(global, micro, world_size=dp_world_size)``). Sum the label-token count over
   the dp ranks (``all_reduce_dp``), normalise every micro-batch loss by that global count,
   backward each, then ``clip_grad_norm_`` (the true total norm; call it on every rank, also
   with ``max_norm=None`` to just measure) and ``optimizer.step()``. For logging, sum the
   per-rank loss with ``all_reduce_dp``.
4. Save with ``components/models/saving.save_final`` (collective; gathers one tensor at a time
   with ``full_tensor`` and rank 0 writes it); small state such as LoRA adapters may be gathered
   whole with ``gather_full_state_dict(trainable_only=True)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from automodel_cli.components.distributed.mesh import fsdp_mesh, tp_mesh, tp_size
from automodel_cli.components.distributed.plans import resolve_plan, validate_tp
from automodel_cli.components.models.structure import decoder_layers, decoder_stack, retie, shared_parameters, unwrap
from automodel_cli.components.training.memory import compile_decoder_layers, enable_activation_checkpointing
from automodel_cli.errors import UserError


def parallelize_model(
    model: Any,
    mesh: Any,
    *,
    plan_registry: Any = None,
    plan_options: Any = None,
    tp: int = 1,
    sequence_parallel: bool = False,
    activation_checkpointing: bool | str = False,
    mixed_precision: bool,
    reshard_after_forward: bool = True,
    compile: bool = False,
    compile_backend: str = "inductor",
    ep: int = 1,
    pipeline: bool = False,
    unshardable: Any = None,
) -> Any:
    """Parallelize ``model`` in place over ``mesh`` (from ``build_mesh``; None for one process)
    and return it.

    ``tp`` must equal the mesh's tp size (it is passed explicitly so a mismatch is caught);
    ``plan_registry`` (the ``ParallelPlanRegistry``) is needed only when ``tp > 1``;
    ``plan_options(model_type)`` gives the chosen plan's declared options (``distributed.MODEL_TYPE``),
    passed to it as keyword arguments.
    ``mixed_precision`` makes FSDP compute in bf16 and reduce gradients in fp32 (GPU runs).
    ``activation_checkpointing`` is false/true or none/full/selective (see
    ``components/training/memory.py``); ``compile`` compiles each decoder layer with
    ``compile_backend`` after checkpointing and before ``fully_shard``. ``ep`` splits the experts
    of a mixture-of-experts model (prepared by ``components/moe/experts.install_experts``) over
    groups of ``ep`` dp_shard ranks (``components/moe/dispatch.shard_experts``). ``pipeline``:
    ``model`` is a pipeline rank's part, whose first stage runs the decoder without the root's
    forward: the embedding becomes an FSDP unit of its own, gathered by its own hooks.
    ``unshardable(model, shards)``: the parameters FSDP must leave whole on every process (a
    QLoRA base weight whose quantization blocks do not split into ``shards`` equal parts,
    ``components/peft/quantize.unshardable_weights``).
    """
    if tp != tp_size(mesh):
        raise ValueError(f"tp={tp} but the mesh has tp={tp_size(mesh)}")
    if sequence_parallel and tp == 1:
        sequence_parallel = False
    hf_model = unwrap(model)
    if sequence_parallel and hf_model is not model:
        _require_torch_for_lora_sequence_parallel()

    # 0. Expert parallelism: the experts' parameters become Shard(0) DTensors on the ep mesh,
    #    which the TP plan skips and FSDP is told to ignore.
    experts: set[Any] = set()
    if ep > 1:
        from automodel_cli.components.moe.dispatch import shard_experts

        experts = shard_experts(model, mesh, ep)

    # 1. Tensor parallelism.
    if tp > 1:
        config = hf_model.config
        validate_tp(config, tp)
        plan_fn = resolve_plan(plan_registry, config.model_type, tp)
        tmesh = tp_mesh(mesh)
        options = plan_options(config.model_type) if plan_options is not None else {}
        plan = plan_fn(model, tmesh, sequence_parallel, **options)
        plan = _expand_for_peft(model, plan, sequence_parallel)
        apply_tp_plan(model, tmesh, plan)
        if sequence_parallel:
            _check_sequence_length(model, tp)

    # 2. Activation checkpointing (recompute decoder layers in backward), then torch.compile per
    #    layer (the compiled layer includes its checkpointing; FSDP's hooks stay outside).
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        compile_decoder_layers(model, compile_backend)

    # 3. FSDP2 / HSDP over the data-parallel ranks.
    dp = fsdp_mesh(mesh)
    if dp is not None:
        import torch
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if mixed_precision else MixedPrecisionPolicy())
        layers = decoder_layers(model)
        # Expert-parallel experts are sharded already; ``unshardable`` names parameters that
        # cannot be cut into dp.shape[-1] shards (QLoRA's quantization blocks): they stay whole.
        ignored = experts | (unshardable(model, dp.shape[-1]) if unshardable is not None else set())
        for i, layer in enumerate(layers):
            # The last layer's parameters are needed first in backward: keep them gathered.
            fully_shard(layer, mesh=dp, mp_policy=policy,
                        reshard_after_forward=reshard_after_forward and i < len(layers) - 1,
                        ignored_params=ignored & set(layer.parameters()) or None)
        embedding = getattr(decoder_stack(model)[1], "embed_tokens", None) if pipeline else None
        if embedding is not None:
            fully_shard(embedding, mesh=dp, mp_policy=policy)
        fully_shard(model, mesh=dp, mp_policy=policy, ignored_params=ignored or None)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                if hasattr(module, "set_force_sum_reduction_for_comms"):  # torch >= 2.8
                    module.set_force_sum_reduction_for_comms(True)
    return model


# --------------------------------------------------------------------------- tensor parallel

def _require_torch_for_lora_sequence_parallel() -> None:
    """LoRA under sequence parallelism needs DTensor views that torch 2.11 lacks (seen on a GPU
    machine: "Attempted to flatten multiple dimensions, with dimension 1 being sharded");
    torch 2.13 runs it exactly (tested)."""
    import torch

    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if version < (2, 13):
        raise UserError(
            f"LoRA with distributed.sequence_parallel=true needs torch >= 2.13 (this is "
            f"{torch.__version__}).",
            "Set distributed.sequence_parallel=false (tensor parallelism still works) or upgrade torch.",
        )


def apply_tp_plan(model: Any, tmesh: Any, plan: dict[str, Any]) -> None:
    """``parallelize_module`` with the plan, keeping tied parameters (embedding = lm_head) tied."""
    from torch.distributed.tensor.parallel import parallelize_module

    from torch.distributed.tensor import DTensor, Replicate

    from automodel_cli.components.distributed.plans import ReplicateParallel

    shared = shared_parameters(model)
    trainable = {name: p.requires_grad for name, p in model.named_parameters(remove_duplicate=False)}
    parallelize_module(model, tmesh, plan)
    # Parameters the plan left alone become Replicate DTensors (a plain tensor next to DTensors
    # breaks foreach optimizers and FSDP x TP gradient norms).
    for module in list(model.modules()):
        if any(not isinstance(p, DTensor) for p in module.parameters(recurse=False)):
            ReplicateParallel(Replicate())._apply(module, tmesh)
    retie(model, shared)
    # SequenceParallel re-creates parameters as trainable; frozen (LoRA base) weights stay frozen.
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in trainable and param.requires_grad != trainable[name]:
            param.requires_grad_(trainable[name])
    _materialize_partial_grads(model)


def _materialize_partial_grads(model: Any) -> None:
    """DTensor leaves the gradient of a replicated parameter that met a sharded input (norms
    under sequence parallelism, per-head q/k norms, LoRA B after a row-parallel A) as a pending
    sum (``Partial``). FSDP2 reduces those itself; without FSDP, optimizers and norms would read
    the wrong values, so each such gradient is summed over the TP group once it is accumulated."""
    from torch.distributed.tensor import DTensor

    def hook(param: Any) -> None:
        grad = param.grad
        if isinstance(grad, DTensor) and tuple(grad.placements) != tuple(param.placements):
            param.grad = grad.redistribute(placements=param.placements)

    for param in model.parameters():
        if isinstance(param, DTensor) and param.requires_grad:
            param.register_post_accumulate_grad_hook(hook)


def _is_lora_layer(module: Any) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "lora_B")


def _expand_for_peft(model: Any, plan: dict[str, Any], sequence_parallel: bool) -> dict[str, Any]:
    """Rewrite plan entries that hit a peft LoRA layer: the base layer gets the style; for a
    column-parallel layer ``lora_B`` is column-parallel too (``lora_A`` replicated); for a
    row-parallel layer ``lora_A`` is row-parallel (``lora_B`` replicated, or
    ``ReplicateParallel(Shard(1))`` under sequence parallelism). The sum base + B(A(x)) then has
    the base layer's layout on every rank."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from torch.distributed.tensor import Shard

    from automodel_cli.components.distributed.plans import ReplicateParallel

    out: dict[str, Any] = {}
    for fqn, style in plan.items():
        try:
            module = model.get_submodule(fqn)
        except AttributeError:
            out[fqn] = style
            continue
        if not _is_lora_layer(module):
            out[fqn] = style
            continue
        if any(bool(v) for v in getattr(module, "use_dora", {}).values()):
            raise UserError(
                f"DoRA adapters cannot be tensor-parallel ({fqn}).",
                "Use peft.method=lora with distributed.tp>1, or distributed.tp=1 with DoRA.",
            )
        adapters = list(getattr(module.lora_A, "keys", lambda: [])())
        if not adapters:
            raise UserError(f"Only LoRA on linear layers can be tensor-parallel ({fqn}).",
                            "Leave embeddings out of peft.target_modules, or set distributed.tp=1.")
        out[f"{fqn}.base_layer"] = style
        for name in adapters:
            if isinstance(style, ColwiseParallel):
                out[f"{fqn}.lora_B.{name}"] = ColwiseParallel(
                    output_layouts=style.output_layouts[0], use_local_output=style.use_local_output)
            elif isinstance(style, RowwiseParallel):
                out[f"{fqn}.lora_A.{name}"] = RowwiseParallel(
                    input_layouts=style.input_layouts[0], output_layouts=style.output_layouts[0],
                    use_local_output=style.use_local_output)
                if sequence_parallel:
                    out[f"{fqn}.lora_B.{name}"] = ReplicateParallel(Shard(1))
            else:
                raise UserError(
                    f"The parallel plan gives the LoRA-wrapped module {fqn} a {type(style).__name__}; "
                    f"only ColwiseParallel and RowwiseParallel can be applied to LoRA layers.",
                    "Fix the plan, or leave that module out of peft.target_modules.",
                )
    return out


def _check_sequence_length(model: Any, tp: int) -> None:
    def check(module: Any, args: tuple, kwargs: dict) -> None:
        tensor = kwargs.get("input_ids")
        if tensor is None:
            tensor = kwargs.get("inputs_embeds")
        if tensor is None and args:
            tensor = args[0]
        length = getattr(tensor, "shape", (0, 0))[1] if getattr(tensor, "ndim", 0) >= 2 else None
        if length is not None and length % tp:
            raise UserError(
                f"Sequence parallelism needs the sequence length to be divisible by "
                f"distributed.tp={tp}; this batch has length {length}.",
                f"Pad batches to a multiple of {tp}, or turn sequence parallelism off.",
            )

    model.register_forward_pre_hook(check, with_kwargs=True)


# --------------------------------------------------------------------------- activation checkpointing

def apply_activation_checkpointing(model: Any, mode: bool | str = True) -> str:
    """Non-reentrant checkpointing of the decoder layers: all of them (``True``/``"full"``) or
    every other one (``"selective"``); ``False``/``"none"`` does nothing. HF's own switch when
    the model has it (parameter names unchanged), else torch's ``checkpoint_wrapper`` around each
    chosen layer. Both compose with FSDP2 (the layer's all-gather is simply repeated in
    recompute). Returns the normalised mode."""
    return enable_activation_checkpointing(model, mode)


# --------------------------------------------------------------------------- clip and save

def clip_grad_norm_(parameters: Iterable[Any], max_norm: float | None, norm_type: float = 2.0,
                    foreach: bool | None = None, *, pipeline_group: Any = None,
                    uncounted: Iterable[Any] = ()) -> float:
    """Clip gradients by their total norm over the whole model and all ranks; return that norm.

    Gradients may be DTensors on different meshes (FSDP, TP, FSDP x TP, the experts on the "ep"
    mesh, plus plain tensors for replicated parameters): norms are computed per (mesh,
    placements) group, turned into the true global norm with ``full_tensor()`` and combined (an
    ep mesh spans one copy of the experts: their replicas are not counted twice). ``max_norm=None`` only measures.
    Collective when any gradient is a DTensor: call it on every rank.
    ``pipeline_group``: each rank holds one pipeline stage's parameters; the stages' norms are
    combined over it. ``uncounted``: parameters clipped with the others but left out of the norm
    (a tied weight's second copy on another stage, whose gradient equals the first's).
    """
    import math

    import torch
    from torch.distributed.tensor import DTensor

    skipped = {id(p) for p in uncounted}
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None and id(p) not in skipped]
    extra = [p.grad for p in parameters if p.grad is not None and id(p) in skipped]
    if not grads and pipeline_group is None:
        return 0.0
    norm_type = float(norm_type)
    groups: dict[Any, list[Any]] = {}
    for grad in grads:
        key = (grad.device_mesh, tuple(grad.placements)) if isinstance(grad, DTensor) else ("plain", grad.device)
        groups.setdefault(key, []).append(grad)
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group, norm_type, error_if_nonfinite=False, foreach=foreach)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        norms.append(norm.float().cpu())
    stacked = torch.stack(norms) if norms else torch.zeros(1)
    if math.isinf(norm_type):
        total = stacked.max()
    else:
        total = stacked.pow(norm_type).sum()
    if pipeline_group is not None:
        import torch.distributed as dist

        device = "cuda" if dist.get_backend(pipeline_group) == "nccl" else "cpu"
        combined = total.to(device)
        dist.all_reduce(combined, op=dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM,
                        group=pipeline_group)
        total = combined.cpu()
    if not math.isinf(norm_type):
        total = total.pow(1.0 / norm_type)
    total_value = float(total)
    if max_norm is not None:
        coef = torch.clamp(torch.tensor(float(max_norm)) / (total + 1e-6), max=1.0)
        if coef < 1.0:
            for grad in [*(g for group in groups.values() for g in group), *extra]:
                grad.mul_(coef.to(dtype=grad.dtype).item())
    return total_value


def sharded_state_dict(model: Any, *, trainable_only: bool = False) -> dict[str, Any]:
    """The model's state dict as this rank holds it, gathering nothing: DTensor shards under
    FSDP2/TP, plain tensors otherwise (they share storage with the parameters). Keys are the
    model's canonical names (no FSDP, compile or activation-checkpoint wrapper prefixes; for
    peft models ``base_model.model...``), in module order, the same on every rank.
    ``trainable_only`` keeps only parameters that require gradients (LoRA: the adapters)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=trainable_only))
    if trainable_only:  # DCP keeps the second name of a tied frozen weight (lm_head = embed)
        frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        state = {k: v for k, v in state.items() if k not in frozen}
    return state


def full_tensor(value: Any, *, keep: bool) -> Any:
    """``value`` (a DTensor shard or a plain tensor) as one whole CPU tensor where ``keep``, else
    None. Collective for a DTensor: every rank must call it, for the same value, in the same
    order. Only this one tensor is gathered, so a caller that writes each tensor before it asks
    for the next holds one tensor at a time."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        value = value.full_tensor()
    return value.detach().cpu() if keep else None


def gather_full_state_dict(model: Any, *, trainable_only: bool = False, everywhere: bool = False) -> dict[str, Any]:
    """The whole model's state dict as plain CPU tensors on rank 0 (``{}`` on other ranks; with
    ``everywhere`` on every rank: a pipeline stage's ranks each get their stage's tensors).

    Collective under a process group: every rank must call it. Keys as ``sharded_state_dict``,
    as ``save_pretrained(state_dict=)`` expects them. ``trainable_only`` skips frozen parameters
    (LoRA: gather just the adapters). For the whole model, prefer gathering one tensor at a
    time with ``full_tensor`` (``components/models/hf_stream.py`` does).
    """
    import torch.distributed as dist

    keep = everywhere or not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    state = sharded_state_dict(model, trainable_only=trainable_only)
    gathered = {name: full_tensor(value, keep=keep) for name, value in state.items()}
    return gathered if keep else {}
