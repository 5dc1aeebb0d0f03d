"""Float8 training (``train.precision=fp8``) with torchao's float8 linear layers.

What changes: every linear layer of the text decoder's layers (attention and MLP projections)
becomes a torchao ``Float8Linear``, whose matrix products cast their inputs, weights and output
gradients to float8 with dynamic scales and run on the GPU's float8 tensor cores; parameters,
optimizer state and everything else keep their dtype. The LM head, the embeddings and a
mixture of experts' router stay as they are (float8 there costs accuracy for little speed), and
so does any layer whose two dimensions are not both multiples of 16 (the float8 matrix product
needs them). LoRA adapters
are never converted: only a frozen base layer under them is.

Recipes (``train.fp8_recipe``) are torchao's: ``tensorwise`` (one scale per tensor: the fastest,
and under FSDP2 the weights are all-gathered in float8, halving that traffic) and ``rowwise``
(one scale per row: more accurate with outliers, all-gathered in the parameter dtype).

The conversion runs before ``train.compile`` and FSDP2 (``training/model_setup.prepare_model``),
on the meta device too: the converted layers keep their parameter names, so checkpoints, final
outputs and resumes are those of the plain model.

Requirements: a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell) and the
torchao package (``pip install 'automodel-cli[fp8]'``). ``check`` refuses anything else before
the run reads or writes anything; ``requirement_problem`` is the same rule for the pre-launch
checks (``components/launch/preflight.py``).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from automodel_cli.errors import UserError

RECIPES = ("tensorwise", "rowwise")
#: The oldest CUDA compute capability with float8 tensor cores (Ada: L4, L40S, RTX 4090).
MIN_CAPABILITY = (8, 9)
#: Both dimensions of a converted linear layer must be multiples of this.
DIM_MULTIPLE = 16
INSTALL_HINT = "pip install 'automodel-cli[fp8]'"
REQUIREMENT = ("train.precision=fp8 needs a CUDA GPU of compute capability 8.9 or newer (e.g. H100, H200, B200, "
               "L4, L40S, RTX 4090) and the torchao package")
REQUIREMENT_HINT = (f"Set train.precision=auto to train in bf16/fp32 here, or run on such a GPU ({INSTALL_HINT} "
                    f"adds torchao).")
TP_HINT = "Set distributed.tp=1 (FSDP2 shards the float8 layers) or train.precision=auto."
_ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def enabled(cfg: Any) -> bool:
    return cfg.train.precision == "fp8"


def requirement_problem(device_type: str, capability: tuple[int, int] | None, torchao_found: bool) -> str | None:
    """Why float8 training cannot run on this device (``capability``: the CUDA compute
    capability, None off CUDA), or None when it can. One paragraph naming the requirement."""
    needs = REQUIREMENT
    if device_type != "cuda" or capability is None:
        return f"{needs}; this run is on {device_type}."
    if tuple(capability) < MIN_CAPABILITY:
        return f"{needs}; this GPU has compute capability {capability[0]}.{capability[1]}."
    if not torchao_found:
        return f"{needs}, which is not installed: {INSTALL_HINT} installs it."
    return None


def tensor_parallel_problem(tp: int) -> str | None:
    """Float8 layers need torchao's own tensor-parallel styles, which the parallel plans do not
    use: fp8 runs with FSDP2 (and pipeline stages) only."""
    if tp > 1:
        return (f"train.precision=fp8 does not combine with tensor parallelism (distributed.tp={tp}): the "
                f"tensor-parallel plans shard plain linear layers, not torchao's float8 ones.")
    return None


def torchao_installed() -> bool:
    return importlib.util.find_spec("torchao") is not None


def device_problem(device: Any) -> str | None:
    """``requirement_problem`` for a torch device (its capability read from CUDA)."""
    import torch

    kind = getattr(device, "type", str(device))
    capability = torch.cuda.get_device_capability(device) if kind == "cuda" else None
    return requirement_problem(kind, capability, torchao_installed())


def check(cfg: Any, device: Any) -> None:
    """Raise a ``UserError`` when ``train.precision=fp8`` cannot run on ``device``."""
    if not enabled(cfg):
        return
    problem = device_problem(device)
    if problem:
        raise UserError(problem, REQUIREMENT_HINT)
    problem = tensor_parallel_problem(cfg.distributed.tp)
    if problem:
        raise UserError(problem, TP_HINT)


def import_float8() -> Any:
    """``torchao.float8`` (``components/torchao_import.py``)."""
    from automodel_cli.components.torchao_import import import_torchao

    return import_torchao("torchao.float8", feature="train.precision=fp8", extra="fp8",
                          instead="train.precision=auto")


def linear_config(recipe: str, *, sharded: bool) -> Any:
    """torchao's ``Float8LinearConfig`` for ``recipe``; float8 all-gathers under FSDP2 where the
    recipe supports them (tensorwise scales)."""
    float8 = import_float8()
    config = float8.Float8LinearConfig.from_recipe_name(recipe)
    if sharded and recipe == "tensorwise":
        import dataclasses

        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
    return config


def convertible_layers(model: Any) -> set[int]:
    """The ids of the linear layers ``convert`` turns into ``Float8Linear``: inside the text
    decoder's layers, not LoRA adapters, both dimensions multiples of ``DIM_MULTIPLE``."""
    import torch

    from automodel_cli.components.models.structure import decoder_stack, num_experts, unwrap

    layers = getattr(decoder_stack(model)[1], "layers", None) or []
    # A mixture of experts' router (hidden -> experts) decides where tokens go: it stays exact.
    experts = num_experts(getattr(unwrap(model), "config", None) or {})
    chosen: set[int] = set()
    for layer in layers:
        for name, module in layer.named_modules():
            if (type(module) is torch.nn.Linear and not any(part in name.split(".") for part in _ADAPTER_PARTS)
                    and module.in_features % DIM_MULTIPLE == 0 and module.out_features % DIM_MULTIPLE == 0
                    and module.out_features != experts):
                chosen.add(id(module))
    return chosen


def convert(model: Any, recipe: str, *, sharded: bool) -> int:
    """Swap the decoder's linear layers (``convertible_layers``) for torchao ``Float8Linear``
    layers in place; returns how many were converted."""
    float8 = import_float8()
    chosen = convertible_layers(model)
    float8.convert_to_float8_training(model, config=linear_config(recipe, sharded=sharded),
                                      module_filter_fn=lambda module, _name: id(module) in chosen)
    return len(chosen)


def describe(count: int, recipe: str, sharded: bool) -> str:
    gather = ", float8 all-gather" if sharded and recipe == "tensorwise" else ""
    return f"fp8: {count} decoder linear layers train in float8 (torchao, {recipe} scaling{gather})"
