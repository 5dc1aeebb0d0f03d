"""Fold LoRA on fused mixture-of-experts parameters into base weights stored per expert.

A transformers MoE keeps its experts as fused 3-D parameters (``mlp.experts.gate_up_proj``
``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``); peft adapts them with ``ParamWrapper`` modules, one
per parameter, nested when several parameters of one module are adapted
(``mlp.experts.base_layer.lora_A`` belongs to the innermost wrapper). Their ``lora_A`` is
``[E * r, in]`` and ``lora_B`` ``[out, r * E]``: expert ``e`` uses rows ``e*r:(e+1)*r`` of A and
columns ``e, e+E, e+2E, ...`` of B (peft's ``ParamWrapper.get_delta_weight``).

The base checkpoint, though, is usually in the hub's per-expert format
(``mlp.experts.3.gate_proj.weight``, or Mixtral's ``block_sparse_moe.experts.3.w1.weight``), into
which ``save_pretrained`` turns the fused parameters with the model's own weight conversions.
Which rows of which expert each saved tensor holds is found by running those conversions
backwards on a small index tensor (``[E, rows, 1]`` holding ``e * rows + row``): the conversions
only slice, split and stack along the first two dimensions, so each saved tensor comes back holding
its own (expert, row) indices. A merged tensor is then its base tensor plus the delta of the
experts it holds, computed for those experts only: memory stays near one base tensor.

Everything is worked out on the meta device (the base model and the peft wrappers built from
the adapter config, no weights), so the nesting and the scaling are peft's own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from automodel_cli.errors import UserError


@dataclass(frozen=True)
class ExpertAdapter:
    """One fused expert parameter adapted by a peft ``ParamWrapper``."""

    param: str  # the model's name for it: model.layers.0.mlp.experts.gate_up_proj
    module: str  # the wrapper's name under the peft model, without ``base_model.model.``
    num_experts: int
    rows: int  # size of the parameter's second dimension
    swapped: bool  # stored [E, out, in] (transformers' experts), else [E, in, out]
    scaling: float


@dataclass(frozen=True)
class Piece:
    """The part of an adapted expert parameter that one saved tensor holds: ``index`` is the
    saved tensor's shape without its last dimension, each element ``expert * rows + row``."""

    adapter: ExpertAdapter
    index: torch.Tensor


def expert_adapters(model: Any, adapter_config: dict[str, Any], adapter: str = "default") -> list[ExpertAdapter]:
    """The fused expert parameters ``adapter_config`` adapts on ``model`` (a meta-device base
    model, which gets peft's wrappers), found by applying the config as peft does at load."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import ParamWrapper

    if not adapter_config.get("target_parameters"):
        return []
    fields = set(LoraConfig.__dataclass_fields__)
    skip = {"peft_type", "base_model_name_or_path"}  # the base is the meta model at hand
    config = LoraConfig(**{k: v for k, v in adapter_config.items() if k in fields and k not in skip})
    config.inference_mode = True
    with torch.device("meta"):
        peft_model = get_peft_model(model, config, adapter_name=adapter)
    found = []
    for name, module in peft_model.named_modules():
        if not isinstance(module, ParamWrapper) or adapter not in module.lora_A:
            continue
        param = module.get_param()
        if param.ndim != 3:  # a router or other 2-D weight: merged as a linear layer's
            continue
        module_name = name.removeprefix("base_model.model.")
        owner = module_name
        while owner.endswith(".base_layer"):
            owner = owner.removesuffix(".base_layer")
        found.append(ExpertAdapter(param=f"{owner}.{module.parameter_name}", module=module_name,
                                   num_experts=int(param.shape[0]), rows=int(param.shape[1]),
                                   swapped=bool(module._did_swap_in_out_features),
                                   scaling=float(module.scaling[adapter])))
    return found


def saved_pieces(model: Any, adapters: list[ExpertAdapter], base_keys: set[str]) -> dict[str, Piece]:
    """Saved key -> the piece of an adapted expert parameter it holds, in the base's own format:
    per expert when the base stores experts that way, the fused parameter itself when it is fused."""
    from automodel_cli.components.models.hf_stream import reverted

    pieces: dict[str, Piece] = {}
    for adapter in adapters:
        index = torch.arange(adapter.num_experts * adapter.rows, dtype=torch.float64)
        index = index.reshape(adapter.num_experts, adapter.rows, 1)
        split = {adapter.param: index} if adapter.param in base_keys else reverted(model, {adapter.param: index})
        if not split or not set(split) <= base_keys:
            missing = sorted(set(split) - base_keys) or [adapter.param]
            raise UserError(
                f"The adapter changes the experts' `{adapter.param}`, but the base model stores it "
                f"neither fused nor as `{missing[0]}`.",
                "Pass --base-model DIR with the weights the adapter was trained on, or export the "
                "adapter without --merge-lora.")
        for key, value in split.items():
            pieces[key] = Piece(adapter, value.squeeze(-1).round().long())
    return pieces


def merged_piece(piece: Piece, base: torch.Tensor, read: Callable[[str], torch.Tensor],
                 prefix: str, adapter: str) -> torch.Tensor:
    """``base`` (a saved tensor) plus the LoRA delta of the rows it holds, in ``base``'s dtype."""
    spec = piece.adapter
    lora_a = read(f"{prefix}{spec.module}.lora_A.{adapter}.weight").float()
    lora_b = read(f"{prefix}{spec.module}.lora_B.{adapter}.weight").float()
    rank = lora_a.shape[0] // spec.num_experts
    experts, position = torch.unique(piece.index // spec.rows, return_inverse=True)
    a = lora_a.reshape(spec.num_experts, rank, -1)[experts]  # (k, r, in)
    b = lora_b.reshape(lora_b.shape[0], rank, spec.num_experts)[:, :, experts].permute(2, 0, 1)  # (k, out, r)
    delta = (b @ a) * spec.scaling  # (k, out, in)
    if not spec.swapped:  # parameter stored [E, in, out]
        delta = delta.transpose(1, 2)
    rows = delta[position, piece.index % spec.rows]
    if tuple(rows.shape) != tuple(base.shape):
        raise UserError(f"Cannot merge the experts' LoRA into a base tensor of shape {list(base.shape)} "
                        f"(the adapter gives {list(rows.shape)}).",
                        "Export the adapter without --merge-lora and merge it with peft's merge_and_unload.")
    return (base.float() + rows).to(base.dtype)
