"""QLoRA's frozen base: the decoder's linear weights quantized as they are loaded.

``peft.method=qlora`` replaces every linear layer of the text decoder's layers (attention and MLP
projections; not the LM head, not the embeddings) with a ``QuantizedLinear``: an ``nn.Linear``
subclass, so peft wraps it with LoRA like any linear layer, whose frozen weight is stored
quantized and dequantized for each matrix product. ``peft.quantization``:

* ``nf4`` (default): torchao's ``NF4Tensor``, QLoRA's 4-bit NormalFloat: blocks of 64 values
  share one absmax scale, the scales themselves quantized to int8 per block of up to 256 scales
  (double quantization; ``scaler_block``: within one row where rows hold whole blocks, so that
  the layer cuts into row shards whatever the process count), about 0.52 bytes per weight.
  ``linear_nf4`` dequantizes in forward and backward (the weight gets no gradient). NF4Tensor
  is a tensor subclass that FSDP2 knows how to shard, which is why it is preferred to
  bitsandbytes' 4-bit layers (CUDA kernels, layers that FSDP2 cannot shard, no CPU path for
  tests).
* ``int8``: symmetric per-output-row int8 with one float scale per row (about 1 byte per weight);
  plain PyTorch.

A layer whose weight cannot be cut into NF4 blocks (fewer than 64 values per block row) stays a
frozen ``nn.Linear``.

On several processes FSDP2 shards the frozen quantized weight along its rows like any parameter
(NF4Tensor implements FSDP2's all-gather extensions; an int8 weight is a plain tensor and its
per-row scale a small replicated buffer): each process keeps its rows' NF4 data and scales and
the whole weight is gathered for its layer's forward and backward. A weight whose rows do not
split evenly into whole NF4 blocks and scale blocks (``shardable``) stays whole on every process
(``unshardable_weights``, left out of FSDP2).

Loading never holds the whole model at full precision: on the meta path (``model.meta_init``)
a quantized layer's weight is an empty quantized tensor of the right kind (what FSDP2 shards),
and each one is read from the safetensors files, quantized whole and cut to this process's rows
before the next is read (``components/models/materialize.py``); on the whole-model path each
weight is quantized as its layer is replaced (and FSDP2 cuts it afterwards). ``final/`` gets
the adapter (it loads with peft on the original base) and ``quantization.json``, from which
``merge_adapter`` merges into the dequantized base the adapter was trained against.
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


def scaler_block(shape: tuple[int, ...]) -> int:
    """NF4's double-quantization block (scales per int8 scale block) for a weight of ``shape``:
    the largest divisor of 256 that divides the blocks of one row when rows hold whole blocks, so
    every row shard holds whole scale blocks whatever the number of processes (and the weight
    quantizes the same on one process as on several); else of the whole weight's block count."""
    blocks_per_row, rest = divmod(shape[-1], NF4_BLOCK)
    if len(shape) == 2 and not rest:
        return math.gcd(blocks_per_row, NF4_SCALER_BLOCK)
    return math.gcd(math.prod(shape) // NF4_BLOCK, NF4_SCALER_BLOCK)


def shardable(shape: tuple[int, ...], method: str, shards: int) -> bool:
    """Whether FSDP2 can cut a ``method`` weight of ``shape`` into ``shards`` equal row shards:
    rows divide evenly (a quantized weight cannot be padded) and, for NF4, each shard holds
    whole blocks and whole scale blocks."""
    rows = shape[0]
    if rows % shards:
        return False
    if method != "nf4":
        return True
    shard_blocks, rest = divmod(rows // shards * math.prod(shape[1:]), NF4_BLOCK)
    return not rest and shard_blocks % scaler_block(shape) == 0


def empty_quantized(weight: torch.Tensor, method: str) -> torch.Tensor:
    """An empty (meta) stored weight of the kind ``quantize`` makes from ``weight``: what FSDP2
    shards before the values are read."""
    if method == "nf4":
        return nf4_module().to_nf4(weight.detach(), NF4_BLOCK, scaler_block(tuple(weight.shape)))
    return torch.empty(weight.shape, dtype=torch.int8, device=weight.device)


def quantize(weight: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(stored weight, per-row scale or None) of a full-precision ``weight``."""
    weight = weight.detach().contiguous()
    if method == "nf4":
        return nf4_module().to_nf4(weight, NF4_BLOCK, scaler_block(tuple(weight.shape))), None
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


class Int8Linear(torch.autograd.Function):
    """``x @ dequantize(weight, scale).T`` that keeps the int8 weight for the backward pass and
    dequantizes it again there (as torchao's ``linear_nf4`` does for NF4): plain ``F.linear`` on
    the dequantized weight would keep a full-precision copy of every layer's weight until the
    backward, more memory than the unquantized model's LoRA run."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, scale)
        return torch.nn.functional.linear(x, dequantize(weight, scale, x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        weight, scale = ctx.saved_tensors
        return grad @ dequantize(weight, scale, grad.dtype), None, None


class QuantizedLinear(torch.nn.Linear):
    """A frozen linear layer whose weight is stored quantized (``quantization``); until it is
    filled (``store``) the weight is the meta tensor of the layer it replaced."""

    def __init__(self, layer: torch.nn.Linear, method: str):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.quantization = method
        self.compute_dtype = layer.weight.dtype  # the dtype a full-precision weight is given before quantizing
        self.bias = None if layer.bias is None else torch.nn.Parameter(layer.bias.detach(), requires_grad=False)
        self.register_buffer("weight_scale", None, persistent=False)
        if layer.weight.is_meta:
            self.weight = torch.nn.Parameter(empty_quantized(layer.weight, method), requires_grad=False)
        else:
            self.store(layer.weight)

    def store(self, weight: torch.Tensor) -> None:
        """Quantize ``weight`` (the full-precision weight, on the training device) into this layer;
        where FSDP2 shards the layer's weight, this process keeps only its rows of the result."""
        from torch.distributed.tensor import DTensor

        stored, scale = quantize(weight, self.quantization)
        current = self._parameters.get("weight")
        if isinstance(current, DTensor):
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            local_shape, offset = compute_local_shape_and_global_offset(current.shape, current.device_mesh,
                                                                        current.placements)
            rows = local_shape[0]
            stored = torch.chunk(stored, stored.shape[0] // rows, dim=0)[offset[0] // rows]
            stored = DTensor.from_local(stored, current.device_mesh, current.placements, run_check=False,
                                        shape=current.shape, stride=current.stride())
        self.weight = torch.nn.Parameter(stored, requires_grad=False)
        self.weight_scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_scale is None:
            out = nf4_module().linear_nf4(x, self.weight)
        else:
            out = Int8Linear.apply(x, self.weight, self.weight_scale)
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


def unshardable_weights(model: Any, shards: int) -> set[torch.nn.Parameter]:
    """The quantized weights FSDP2 cannot cut into ``shards`` row shards (``shardable``): they
    stay whole on every process."""
    return {module.weight for module in model.modules() if isinstance(module, QuantizedLinear)
            and not shardable((module.out_features, module.in_features), module.quantization, shards)}


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
