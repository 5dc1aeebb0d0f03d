"""LoRA and DoRA adapters, built with the peft library rather than by hand."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from automodel_cli.errors import UserError

#: Leaf names that name experts in an explicit ``peft.target_modules`` list (peft maps the
#: transformers 4 names onto the fused expert parameters of transformers 5).
EXPERT_NAMES = frozenset({"experts", "gate_up_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"})
#: Leaf names peft moves from ``target_modules`` onto the fused experts or the router of a
#: transformers 5 MoE, wherever they occur: a linear layer so named (a shared expert, the MLP of
#: a dense layer) is adapted through its ``weight`` parameter instead.
RENAMED_BY_PEFT = EXPERT_NAMES | {"gate"}


def apply_peft(model: Any, peft_cfg: Any, *, ep: int = 1, say: Callable[[str], None] | None = None) -> Any:
    """Wrap ``model`` with LoRA (or DoRA) adapters; returns the model unchanged for ``none``.

    ``target_modules="all-linear"`` adapts every linear layer of the decoder (peft leaves the
    output head out), which is what most recent LoRA recipes use. For a vision-language model it
    means the language model's linear layers only (``vlm.language_lora_targets``): the vision
    tower and projector get no adapters (and stay frozen, as peft freezes every base weight). On
    a mixture-of-experts model the targets are chosen here (``moe_targets``) rather than left to
    peft. An explicit list of names is passed to peft as given, and matches wherever those names
    occur.
    """
    if peft_cfg.method == "none":
        return model
    from peft import LoraConfig, get_peft_model

    from automodel_cli.components.models.heads import is_sequence_classifier
    from automodel_cli.components.models.vlm import language_lora_targets

    target = peft_cfg.target_modules
    parameters: list[str] | None = None
    moe = moe_layout(model)
    if moe is not None:
        check_expert_targets(peft_cfg, ep)
    if target == "all-linear" and moe is not None:
        chosen = moe_targets(model, moe, experts=adapt_experts(peft_cfg, ep), router=bool(peft_cfg.moe_router))
        check_wrapped_parameters(peft_cfg, chosen)
        target, parameters = chosen.modules, chosen.parameters or None
        if say is not None:
            say(f"lora: {chosen.describe()}" + ("" if chosen.experts or not ep > 1 else
                                                f" (experts frozen: distributed.ep={ep} shards them)"))
    elif target == "all-linear":
        target = language_lora_targets(model) or target
    config = LoraConfig(
        r=peft_cfg.rank,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=float(peft_cfg.dropout),
        target_modules=target if isinstance(target, str) else list(target),
        target_parameters=parameters,
        use_dora=peft_cfg.method == "dora",  # qlora: LoRA on the quantized base
        # A sequence classifier's head is new: peft trains and saves it whole (modules_to_save).
        task_type="SEQ_CLS" if is_sequence_classifier(model) else "CAUSAL_LM",
    )
    return get_peft_model(model, config)


# ------------------------------------------------------------------------ mixture of experts
@dataclass(frozen=True)
class MoeLayout:
    """Where a mixture-of-experts model keeps its experts and routers (module names)."""

    experts: dict[str, list[str]]  # experts module -> its fused (3-D) parameters
    routers: dict[str, list[str]]  # router module -> its 2-D parameters
    blocks: tuple[str, ...]  # the sparse MoE blocks holding them


@dataclass
class MoeTargets:
    """What ``all-linear`` adapts on a mixture-of-experts model, in peft's two lists."""

    modules: list[str] = field(default_factory=list)  # nn.Linear modules (lora.Linear)
    parameters: list[str] = field(default_factory=list)  # parameters (lora.ParamWrapper)
    groups: dict[str, int] = field(default_factory=dict)  # group -> how many were adapted
    experts: bool = False

    def describe(self) -> str:
        return "adapted " + ", ".join(f"{group} ({count})" for group, count in self.groups.items() if count)


def moe_layout(model: Any) -> MoeLayout | None:
    """The experts (modules holding parameters stacked ``[num_experts, ...]``) and routers of
    ``model``; None for a dense model (its config names no experts). The router is the module
    the model records ``router_logits`` from (``_can_record_outputs``), else a block's child
    named ``gate`` or ``router``."""
    from automodel_cli.components.models.structure import num_experts

    count = num_experts(getattr(model, "config", None) or {})
    if not count:  # a dense model (a vision tower's 3-D attention-pooling probe is no expert)
        return None
    experts: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        fused = [p for p, value in module.named_parameters(recurse=False)
                 if value.ndim == 3 and value.shape[0] == count]
        if fused:
            experts[name] = fused
    if not experts:
        return None
    router_class = _router_class(model)
    blocks = tuple(sorted({name.rpartition(".")[0] for name in experts}))
    routers: dict[str, list[str]] = {}
    for block in blocks:
        for child_name, child in model.get_submodule(block).named_children():
            if (router_class is not None and isinstance(child, router_class)) or \
                    (router_class is None and child_name in ("gate", "router")):
                weights = [p for p, value in child.named_parameters(recurse=False) if value.ndim == 2]
                if weights:
                    routers[f"{block}.{child_name}"] = weights
    return MoeLayout(experts, routers, blocks)


def _router_class(model: Any) -> type | None:
    for module in model.modules():
        recorder = (getattr(type(module), "_can_record_outputs", None) or {}).get("router_logits")
        target = getattr(recorder, "target_class", None)
        if isinstance(target, type):
            return target
    return None


def moe_targets(model: Any, moe: MoeLayout, *, experts: bool, router: bool) -> MoeTargets:
    """``all-linear`` on a mixture-of-experts model, decided here instead of by peft's implicit
    rules: every ``nn.Linear`` of the decoder (attention; a shared expert), the experts' fused
    projections when ``experts``, the router when ``router``. Linear layers inside an MoE block
    (a shared expert) or named like the experts (a dense layer's ``gate_proj``) are adapted
    through their weight parameter: peft moves module targets so named onto the fused experts."""
    import torch.nn as nn

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chosen = MoeTargets(experts=experts)
    groups = {"attention and other linear layers": 0, "shared-expert linear layers": 0,
              "expert projections": 0, "routers": 0}
    inside = tuple(f"{block}." for block in moe.blocks)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is head or name in moe.routers:
            continue
        shared = name.startswith(inside)
        if shared or name.rpartition(".")[2] in RENAMED_BY_PEFT:
            chosen.parameters.append(f"{name}.weight")
        else:
            chosen.modules.append(name)
        groups["shared-expert linear layers" if shared else "attention and other linear layers"] += 1
    if experts:
        for module, params in moe.experts.items():
            chosen.parameters += [f"{module}.{p}" for p in params]
            groups["expert projections"] += len(params)
    if router:
        for module, params in moe.routers.items():
            chosen.parameters += [f"{module}.{p}" for p in params]
            groups["routers"] += len(params)
    chosen.groups = groups
    return chosen


def adapt_experts(peft_cfg: Any, ep: int) -> bool:
    """``peft.moe_experts``: null (the default) adapts the experts unless expert parallelism
    shards them (``distributed.ep`` > 1)."""
    value = getattr(peft_cfg, "moe_experts", None)
    return ep <= 1 if value is None else bool(value)


def check_expert_targets(peft_cfg: Any, ep: int) -> None:
    """Expert parallelism shards the experts across processes, where peft's expert adapters
    cannot follow: an explicit expert target with ``distributed.ep`` > 1 is refused."""
    if ep <= 1:
        return
    if getattr(peft_cfg, "moe_experts", None) is True:
        raise UserError(f"peft.moe_experts=true cannot be combined with distributed.ep={ep}: expert "
                        "parallelism shards the experts, and LoRA on them is not supported there.",
                        "Leave peft.moe_experts unset (the experts stay frozen) or set distributed.ep=1.")
    named = explicit_expert_names(peft_cfg.target_modules)
    if named:
        raise UserError(f"peft.target_modules names expert projections ({', '.join(named)}), which cannot be "
                        f"adapted with distributed.ep={ep}: expert parallelism shards them.",
                        "Remove them from peft.target_modules (or use all-linear, which leaves the experts "
                        "frozen with ep > 1), or set distributed.ep=1.")


def explicit_expert_names(target_modules: Any) -> list[str]:
    """The entries of an explicit ``peft.target_modules`` list that name experts."""
    if isinstance(target_modules, str):
        return []
    return [str(t) for t in target_modules if str(t).rpartition(".")[2] in EXPERT_NAMES]


def check_wrapped_parameters(peft_cfg: Any, chosen: MoeTargets) -> None:
    """peft adapts parameters (experts, routers, shared experts) with a ``ParamWrapper``, which
    supports neither dropout on the LoRA input nor DoRA: refused with the way out, rather than
    silently adapting less than ``all-linear`` promises."""
    if not chosen.parameters:
        return
    what = ", ".join(group for group, count in chosen.groups.items() if count and group != "attention and other linear layers")
    if float(peft_cfg.dropout) > 0:
        raise UserError(f"peft.dropout={peft_cfg.dropout} cannot be used with LoRA on this mixture-of-experts "
                        f"model's {what}: peft adapts them as parameters, without input dropout.",
                        "Set peft.dropout=0, or peft.moe_experts=false (and leave peft.moe_router off) to adapt "
                        "the attention layers only.")
    if peft_cfg.method == "dora":
        raise UserError(f"peft.method=dora cannot adapt this mixture-of-experts model's {what} (peft has no DoRA "
                        "for parameters).",
                        "Use peft.method=lora, or peft.moe_experts=false to adapt the attention layers only.")


def qlora_problems(method: str, *, tp: int | None = 1, pp: int | None = 1, cp: int | None = 1) -> list[tuple[str, str]]:
    """(key, message) for what ``peft.method=qlora`` cannot do. FSDP2 (and HSDP) shards the
    quantized base over any number of processes; tensor, pipeline and context parallelism are
    refused: the quantized weights have no tensor-parallel layout, and those paths are not
    built for them."""
    if method != "qlora":
        return []
    return [(f"distributed.{key}", f"peft.method=qlora cannot be combined with distributed.{key}={size}: the "
                                   "quantized base is sharded by FSDP2 only. Set distributed."
                                   f"{key}=1 (FSDP2 shards it over all processes), or use peft.method=lora.")
            for key, size in (("tp", tp), ("pp", pp), ("cp", cp)) if (size or 1) > 1]


def check_qlora(cfg: Any, shape: Any) -> None:
    """Raise a ``UserError`` for ``qlora_problems`` (``shape``: the run's parallel sizes), or when
    the NF4 base needs torchao and it is not installed (before the run reads or writes anything)."""
    found = qlora_problems(cfg.peft.method, tp=shape.tp, pp=getattr(shape, "pp", 1), cp=getattr(shape, "cp", 1))
    if found:
        raise UserError(found[0][1])
    if cfg.peft.method == "qlora" and cfg.peft.quantization == "nf4":
        from automodel_cli.components.peft.quantize import import_nf4

        import_nf4()


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
