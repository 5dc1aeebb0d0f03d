"""Vision-language models (image-text-to-text): detection, loading class, freezing, LoRA targets.

A vision-language model (VLM: Qwen2/2.5-VL, Gemma 3, Llava, SmolVLM/Idefics3, ...) is a text
decoder with a vision tower and a projector that turns image features into the decoder's token
embeddings. Transformers loads these with ``AutoModelForImageTextToText``; most of them are not in
``AutoModelForCausalLM``'s mapping at all, so the class has to be chosen from the config before
anything loads. Everything here works from the config (cheap) or from the module structure
(by Hugging Face's conventions, not per-architecture tables), so any ``AutoModelForImageTextToText``
architecture is covered, not only the ones with presets:

* the language model is the text decoder ``structure.decoder_stack`` finds (the module with
  ``embed_tokens`` and a ``layers`` list) plus the LM head;
* everything else inside the multimodal core (the decoder stack's parent) is the vision side;
  the projector is the part of it named like one (``multi_modal_projector``, ``connector``,
  Qwen-VL's ``visual.merger``, ...), the rest is the vision tower.
"""

from __future__ import annotations

import re
from typing import Any

#: Module names (a name's last part) that HF VLMs give the layers mapping image features into the
#: decoder's embedding space: Llava/Gemma 3/PaliGemma, Idefics3/SmolVLM, Qwen2/2.5-VL (inside the
#: vision tower), and common custom-code spellings.
PROJECTOR_NAMES = ("multi_modal_projector", "connector", "merger", "mm_projector", "projector",
                   "vision_projection", "visual_projection")


def _field(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def is_vision_language(config: Any) -> bool:
    """Whether ``config`` (a transformers config, or config.json as a dict) is a VLM's: it has a
    ``vision_config`` and its model type maps in ``AutoModelForImageTextToText`` (or its custom
    code declares that auto class). Reading the config alone is enough, so the loading class is
    known before any weight is read. ``gemma3_text`` (text-only Gemma 3) is not a VLM."""
    if _field(config, "vision_config") is None:
        return False
    auto_map = _field(config, "auto_map") or {}
    if "AutoModelForImageTextToText" in auto_map:
        return True
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return _field(config, "model_type") in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def auto_class(config: Any) -> Any:
    """The transformers auto class that builds ``config``'s model: the task head's when the config
    declares one (``heads.declared_head``: ``AutoModelForSequenceClassification`` for a
    ``...ForSequenceClassification``), ``AutoModelForImageTextToText`` for a VLM (its
    ``...ForConditionalGeneration`` with the vision tower), else ``AutoModelForCausalLM``."""
    from automodel_cli.components.models.heads import declared_head

    head = declared_head(config)
    if head is not None:
        return head
    if is_vision_language(config):
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


# --------------------------------------------------------------------------- parts of a VLM
def _core(model: Any) -> tuple[str, dict[str, Any], str] | None:
    """``(core prefix, vision-side children by name, decoder name)`` of a VLM: the core is the
    module that holds the text decoder next to the vision modules; None for a text-only model."""
    from automodel_cli.components.models.heads import declared_head
    from automodel_cli.components.models.structure import decoder_stack, output_head
    from automodel_cli.errors import UserError

    try:
        prefix, _ = decoder_stack(model)
    except UserError:
        return None
    parent, _, name = prefix.rstrip(".").rpartition(".")
    if not name:
        return None
    core = model.get_submodule(parent) if parent else model
    if declared_head(getattr(core, "config", None) or {}) is not None and \
            getattr(core, "base_model_prefix", None) == name:
        return None  # a text decoder with a task head (``score``) beside it: no vision side
    head, _ = output_head(model)
    others = {child_name: child for child_name, child in core.named_children()
              if child_name != name and child is not head}
    if not any(any(True for _ in child.parameters()) for child in others.values()):
        return None  # a causal LM (``model.model`` beside ``lm_head``): nothing but the decoder
    return (f"{parent}." if parent else ""), others, name


def language_model_prefix(model: Any) -> str | None:
    """The dotted prefix of the text decoder of a VLM (``model.language_model.`` for Qwen2-VL and
    Gemma 3, ``base_model.model.model.language_model.`` under peft); None for a text-only model."""
    found = _core(model)
    return None if found is None else f"{found[0]}{found[2]}."


def vision_parts(model: Any) -> tuple[list[str], list[str]]:
    """``(vision tower parameter names, projector parameter names)`` of a VLM; both empty for a
    text-only model. The vision side is every parameter of the multimodal core outside the text
    decoder; a parameter belongs to the projector when one of its module names is in
    ``PROJECTOR_NAMES`` (Qwen-VL's projector, ``visual.merger``, sits inside the vision tower)."""
    found = _core(model)
    if found is None:
        return [], []
    prefix, vision_side, _ = found
    tower, projector = [], []
    for child_name, child in vision_side.items():
        for name, _ in child.named_parameters():
            full = f"{prefix}{child_name}.{name}"
            parts = f"{child_name}.{name}".split(".")[:-1]
            (projector if any(p in PROJECTOR_NAMES for p in parts) else tower).append(full)
    return tower, projector


def apply_freezing(model: Any, *, freeze_vision: bool, freeze_projector: bool) -> dict[str, int]:
    """Turn off gradients of the vision tower (``freeze_vision``) and/or the projector
    (``freeze_projector``) of a VLM; a text-only model is left as it is. Returns how many
    parameters (elements) were frozen per part, for reporting. Freezing the tower is the usual
    default: it was trained on far more images than a fine-tuning set holds, and training it
    costs memory for its gradients and optimizer state."""
    tower, projector = vision_parts(model)
    frozen = {"vision": 0, "projector": 0}
    params = dict(model.named_parameters())
    for part, names, freeze in (("vision", tower, freeze_vision), ("projector", projector, freeze_projector)):
        if not freeze:
            continue
        for name in names:
            params[name].requires_grad_(False)
            frozen[part] += params[name].numel()
    return frozen


def language_lora_targets(model: Any) -> str | None:
    """peft ``target_modules`` (a regular expression, matched against whole module names) for
    every linear layer of a VLM's text decoder, so ``all-linear`` LoRA leaves the vision tower,
    the projector and the LM head alone (peft's own ``all-linear`` would wrap every linear layer
    of the vision tower too); None for a text-only model (peft's ``all-linear`` is right there)."""
    import torch.nn as nn

    prefix = language_model_prefix(model)
    if prefix is None:
        return None
    leaves = sorted({name.rpartition(".")[2] for name, module in model.named_modules()
                     if name.startswith(prefix) and isinstance(module, nn.Linear)})
    if not leaves:
        return None
    return rf"{re.escape(prefix)}(.*\.)?({'|'.join(map(re.escape, leaves))})"
