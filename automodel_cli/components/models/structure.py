"""Where things are inside a Hugging Face causal LM, with or without a peft wrapper.

Parallelism (TP plans, FSDP units), activation checkpointing, torch.compile, the fused loss and
checkpoints all need the same few facts: the model inside a peft wrapper, the decoder's config
of a multimodal model, the decoder layers and the LM head. They are found here, by structure
and by Hugging Face's own accessors, so that every architecture that follows the conventions
works and each fact has one definition. Nothing here imports torch until it is used.
"""

from __future__ import annotations

from typing import Any

from automodel_cli.errors import UserError


def is_peft_model(model: Any) -> bool:
    """A peft wrapper (``PeftModel`` and its task subclasses, also after ``fully_shard``, which
    subclasses the wrapper's type)."""
    return callable(getattr(type(model), "get_base_model", None)) and hasattr(model, "peft_config")


def unwrap(model: Any) -> Any:
    """The Hugging Face ``PreTrainedModel`` inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if is_peft_model(model) else model


def text_config(config: Any) -> Any:
    """The decoder's config: ``text_config`` of a multimodal config (Gemma 3, Llava, Qwen2-VL),
    else the config itself."""
    getter = getattr(config, "get_text_config", None)
    if callable(getter):
        try:
            return getter(decoder=True)
        except TypeError:  # a config class whose getter takes no arguments
            return getter()
    return getattr(config, "text_config", None) or config


#: Config fields that give a mixture of experts' number of routed experts, and the experts each
#: token is routed to, by family (Qwen/OLMoE, Mixtral, DeepSeek, ...).
NUM_EXPERTS_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k", "experts_per_token", "top_k")


def config_value(config: Any, names: tuple[str, ...]) -> int | None:
    """The first positive integer among ``names`` in the decoder's config (a ``PretrainedConfig``
    or a config.json dict; a multimodal config's ``text_config``), or None."""
    if isinstance(config, dict):
        text = config.get("text_config")
        config = text if isinstance(text, dict) else config
        values = (config.get(name) for name in names)
    else:
        config = text_config(config)
        values = (getattr(config, name, None) for name in names)
    return next((v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0), None)


def num_experts(config: Any) -> int | None:
    """A mixture of experts' number of routed experts (None: a dense model)."""
    return config_value(config, NUM_EXPERTS_KEYS)


def experts_per_token(config: Any) -> int | None:
    """Experts each token is routed to (None: a dense model)."""
    return config_value(config, TOP_K_KEYS) if num_experts(config) else None


def decoder_stack(model: Any) -> tuple[str, Any]:
    """``(prefix, module)`` of the text decoder: the first module with ``embed_tokens`` and a
    ``layers`` ModuleList (``model.`` for a CausalLM, ``base_model.model.model.`` under peft,
    ``model.language_model.`` for Gemma 3 multimodal). ``prefix`` ends with a dot or is empty."""
    import torch.nn as nn

    for name, module in model.named_modules():
        if isinstance(getattr(module, "layers", None), nn.ModuleList) and hasattr(module, "embed_tokens"):
            return (f"{name}." if name else ""), module
    raise UserError(
        f"Cannot find the decoder layers of {type(unwrap(model)).__name__} (no module with "
        f"`embed_tokens` and a `layers` list).",
        "Its tensor-parallel plan must name the modules itself; set distributed.tp=1 meanwhile.",
    )


def decoder_layers(model: Any) -> list[Any]:
    """The modules to shard (and checkpoint, and compile) one by one: HF's ``_no_split_modules``
    classes (decoder layers, vision blocks), outermost only; else the decoder's ``layers`` list."""
    names = set(getattr(unwrap(model), "_no_split_modules", None) or [])
    found: list[Any] = []
    inside: set[int] = set()
    if names:
        for module in model.modules():
            if id(module) in inside:
                continue
            if type(module).__name__ in names:
                found.append(module)
                inside.update(id(m) for m in module.modules())
    if not found:
        _, stack = decoder_stack(model)
        found = list(stack.layers)
    return found


def output_head(model: Any) -> tuple[Any, str | None]:
    """``(module, name)`` of the output projection (``lm_head``): the module HF's
    ``get_output_embeddings`` returns and its dotted name inside ``model`` as given
    (``base_model.model.lm_head`` under peft); ``(None, None)`` for a model without one."""
    getter = getattr(unwrap(model), "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        return None, None
    name = next((name for name, module in model.named_modules() if module is head), None)
    return head, name


def shared_parameters(model: Any) -> list[list[tuple[str, str]]]:
    """Groups of (module FQN, parameter name) that hold the same Parameter object."""
    seen: dict[int, list[tuple[str, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            seen.setdefault(id(param), [])
            if (module_name, param_name) not in seen[id(param)]:
                seen[id(param)].append((module_name, param_name))
    return [group for group in seen.values() if len(group) > 1]


def retie(model: Any, shared: list[list[tuple[str, str]]]) -> None:
    """Make every group of ``shared_parameters`` one Parameter again (after an operation that
    replaced them one by one: a tensor-parallel plan, ``to_empty``)."""
    for group in shared:
        owner = model.get_submodule(group[0][0])
        keep = getattr(owner, group[0][1])
        for module_name, param_name in group[1:]:
            module = model.get_submodule(module_name)
            other = getattr(module, param_name)
            if other is keep:
                continue
            if layout(other) != layout(keep) or other.shape != keep.shape:
                raise UserError(
                    f"Tied parameters {group[0][0]}.{group[0][1]} and {module_name}.{param_name} "
                    f"got different tensor-parallel layouts ({layout(keep)} vs {layout(other)}).",
                    "Give both modules the same sharding in the parallel plan.",
                )
            module.register_parameter(param_name, keep)


def layout(tensor: Any) -> Any:
    placements = getattr(tensor, "placements", None)
    return tuple(placements) if placements is not None else "plain"
