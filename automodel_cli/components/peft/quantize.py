"""QLoRA's frozen base: the decoder's linear weights quantized as they are loaded.

``peft.method=qlora`` replaces every linear layer of the text decoder's layers (attention and MLP
projections; not the LM head, not the embeddings) with a ``QuantizedLinear``: an ``nn.Linear``
subclass, so peft wraps it with LoRA like any linear layer, whose frozen weight is stored
quantized and dequantized for each matrix product. ``peft.quantization``:

* ``nf4`` (default): torchao's ``NF4Tensor``, QLoRA's 4-bit NormalFloat: blocks of 64 values
  share one absmax scale, the scales themselves quantized to int8 per block of up to 256 scales
  (double quantization), about 0.52 bytes per weight. ``linear_nf4`` dequantizes in forward and
  backward (the weight gets no gradient). NF4Tensor is a tensor subclass that FSDP2 knows how to
  shard, which is why it is preferred to bitsandbytes' 4-bit layers (CUDA kernels, layers that
  FSDP2 cannot shard, no CPU path for tests).
* ``int8``: symmetric per-output-row int8 with one float scale per row (about 1 byte per weight);
  plain PyTorch.

A layer whose weight cannot be cut into NF4 blocks (fewer than 64 values per block row) stays a
frozen ``nn.Linear``.

Loading never holds the whole model at full precision: on the meta path (``model.meta_init``)
the quantized layers' weights are left out when the model is allocated and each one is read
from the safetensors files, quantized and stored before the next is read
(``components/models/materialize.py``); on the whole-model path each weight is quantized as its
layer is replaced. ``final/`` gets the adapter (it loads with peft on the original base) and
``quantization.json``, from which ``merge_adapter`` merges into the dequantized base the
adapter was trained against.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import torch

from automodel_cli.components.torchao_import import import_torchao

METHODS = ("nf4", "int8")
NF4_BLOCK = 64  # values per absmax scale (QLoRA's)
NF4_SCALER_BLOCK = 256  # scales per double-quantization block, at most
#: Written next to the adapter in final/: how its base was quantized.
RECORD = "quantization.json"


def import_nf4() -> Any:
    """torchao's NF4 tensor module, or a ``UserError`` naming the install command when torchao is
    missing (``check_qlora`` calls it before the run reads or writes anything)."""
    return import_torchao("torchao.quantization.quantize_.workflows.nf4.nf4_tensor",
                          feature="peft.method=qlora with peft.quantization=nf4", extra="qlora",
                          instead="peft.quantization=int8 (plain PyTorch) or peft.method=lora")


@functools.cache
def nf4_module() -> Any:
    """``import_nf4``, once per process (every NF4 forward needs it)."""
    return import_nf4()


def quantizable(shape: tuple[int, ...], method: str) -> bool:
    """Whether a weight of ``shape`` can be stored as ``method`` (NF4: whole blocks of 64)."""
    return method != "nf4" or math.prod(shape) % NF4_BLOCK == 0


def quantize(weight: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(stored weight, per-row scale or None) of a full-precision ``weight``. NF4's
    double-quantization block is the largest divisor of the block count up to 256 (a small
    layer has fewer than 256 blocks)."""
    weight = weight.detach().contiguous()
    if method == "nf4":
        blocks = weight.numel() // NF4_BLOCK
        return nf4_module().to_nf4(weight, NF4_BLOCK, math.gcd(blocks, NF4_SCALER_BLOCK)), None
    scale = weight.abs().amax(dim=1).clamp(min=torch.finfo(weight.dtype).tiny) / 127
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def dequantize(stored: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The full-precision weight a stored one stands for."""
    if scale is None:
        return stored.get_original_weight().to(dtype)
    return stored.to(dtype) * scale.to(dtype)[:, None]


def round_trip(weight: torch.Tensor, method: str) -> torch.Tensor:
    """``weight`` as its quantized copy computes with (what the adapter was trained against)."""
    stored, scale = quantize(weight, method)
    return dequantize(stored, scale, weight.dtype)


class QuantizedLinear(torch.nn.Linear):
    """A frozen linear layer whose weight is stored quantized (``quantization``); until it is
    filled (``store``) the weight is the meta tensor of the layer it replaced."""

    def __init__(self, layer: torch.nn.Linear, method: str):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.quantization = method
        self.compute_dtype = layer.weight.dtype  # the dtype a full-precision weight is given before quantizing
        self.weight = torch.nn.Parameter(layer.weight.detach(), requires_grad=False)
        self.bias = None if layer.bias is None else torch.nn.Parameter(layer.bias.detach(), requires_grad=False)
        self.register_buffer("weight_scale", None, persistent=False)
        if not layer.weight.is_meta:
            self.store(layer.weight)

    def store(self, weight: torch.Tensor) -> None:
        """Quantize ``weight`` (the full-precision weight, on the training device) into this layer."""
        stored, scale = quantize(weight, self.quantization)
        self.weight = torch.nn.Parameter(stored, requires_grad=False)
        self.weight_scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_scale is None:
            out = nf4_module().linear_nf4(x, self.weight)
        else:
            out = torch.nn.functional.linear(x, dequantize(self.weight, self.weight_scale, x.dtype))
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quantization={self.quantization}"


def decoder_linears(model: Any, method: str) -> list[tuple[Any, str, torch.nn.Linear]]:
    """(decoder layer, name inside it, module) of every plain linear layer of the text decoder's
    layers that ``method`` can store."""
    from automodel_cli.components.models.structure import decoder_stack

    return [(layer, name, module) for layer in getattr(decoder_stack(model)[1], "layers", None) or []
            for name, module in layer.named_modules()
            if type(module) is torch.nn.Linear and quantizable(tuple(module.weight.shape), method)]


def quantize_decoder(model: Any, method: str) -> int:
    """Replace the text decoder's linear layers with ``QuantizedLinear`` in place (before peft
    wraps them); returns how many. Weights still on the meta device are filled later
    (``pending_layers``, ``components/models/materialize.py``)."""
    if method == "nf4":
        nf4_module()  # a missing torchao stops the run before anything is loaded
    chosen = decoder_linears(model, method)
    for layer, name, module in chosen:
        parent, _, child = name.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, child, QuantizedLinear(module, method))
    return len(chosen)


def pending_layers(model: Any) -> dict[str, QuantizedLinear]:
    """Name -> layer of every ``QuantizedLinear`` whose weight is not loaded yet."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, QuantizedLinear) and module.weight.is_meta}


def record(directory: Path, model: Any) -> None:
    """Write ``quantization.json`` next to a QLoRA model's adapter (nothing for other models)."""
    layers = [module for module in model.modules() if isinstance(module, QuantizedLinear)]
    if layers:
        record = {"method": layers[0].quantization, "layers": len(layers), "nf4_block": NF4_BLOCK}
        (Path(directory) / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def recorded_method(adapter_dir: Path) -> str | None:
    """The quantization an adapter directory's base was trained with (None: an ordinary adapter)."""
    path = Path(adapter_dir) / RECORD
    return json.loads(path.read_text())["method"] if path.is_file() else None


def dequantize_base(model: Any, method: str) -> None:
    """Give ``model`` (the original base, loaded whole) the weights its quantized copy computes
    with, layer by layer, so an adapter merged into it reproduces the trained model."""
    with torch.no_grad():
        for _layer, _name, module in decoder_linears(model, method):
            module.weight.copy_(round_trip(module.weight, method))
