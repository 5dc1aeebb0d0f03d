"""Model tensors that are several checkpoint tensors joined: read a shard without the whole.

transformers 5 builds a mixture of experts' weights as one stacked tensor per projection
(``mlp.experts.gate_up_proj [experts, 2 x width, hidden]``) while checkpoints on the hub keep one
tensor per expert and projection (``mlp.experts.3.gate_proj.weight [width, hidden]``): its loader
joins them with the model's weight conversions, and ``save_pretrained`` splits them again. A
process that holds only some experts (expert parallelism, or FSDP2's row shard of the stacked
tensor) should read only those experts' tensors.

The layout is learned from the model's own conversions rather than from a table per
architecture: a probe tensor of two experts whose every element is its own flat index is split
the way ``save_pretrained`` would split it (``transformers.core_model_loading
.revert_weight_conversion``), and each piece's values say where it sits in the joined tensor --
which expert, at which offset, in which orientation. A conversion that does not cut the joined
tensor into whole rectangular blocks of one expert (an interleaved gate/up) gives no layout, and
the model is then loaded whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

#: The expert index inside a checkpoint key (``...experts.3.gate_proj.weight``).
_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


@dataclass(frozen=True)
class Block:
    """One checkpoint tensor per expert: ``template`` names it (``{expert}`` for the index); it
    fills ``shape`` elements at ``start`` of an expert's slab (the joined tensor without its
    first dimension), stored transposed when ``transposed``."""

    template: str
    start: tuple[int, ...]
    shape: tuple[int, ...]
    transposed: bool

    def key(self, expert: int) -> str:
        return self.template.format(expert=expert)


@dataclass(frozen=True)
class Joined:
    """A model tensor ``[experts, ...]`` made of per-expert checkpoint tensors (``blocks``)."""

    experts: int
    blocks: tuple[Block, ...]

    def keys(self) -> list[str]:
        return [block.key(expert) for expert in range(self.experts) for block in self.blocks]

    def read(self, reader: Any, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        """The ``shape`` slice at ``offset`` of the joined tensor, reading only the checkpoint rows
        it covers (``reader.read(key, offset, shape)``)."""
        out: torch.Tensor | None = None
        for index in range(shape[0]):
            expert = offset[0] + index
            for block in self.blocks:
                lows = [max(o, s) for o, s in zip(offset[1:], block.start)]
                highs = [min(o + n, s + m) for o, n, s, m in zip(offset[1:], shape[1:], block.start, block.shape)]
                if any(low >= high for low, high in zip(lows, highs)):
                    continue
                inner = tuple(low - s for low, s in zip(lows, block.start))
                size = tuple(high - low for low, high in zip(lows, highs))
                if block.transposed:
                    part = reader.read(block.key(expert), inner[::-1], size[::-1]).transpose(0, 1)
                else:
                    part = reader.read(block.key(expert), inner, size)
                if out is None:
                    out = torch.empty(shape, dtype=part.dtype)
                out[(index, *(slice(low - o, high - o) for low, high, o in zip(lows, highs, offset[1:])))] = part
        assert out is not None, "a joined tensor's slice covers no checkpoint tensor"
        return out


def joined_layout(model: torch.nn.Module, key: str, shape: tuple[int, ...]) -> Joined | None:
    """How ``model``'s tensor ``key`` of ``shape`` (``[experts, ...]``) is made of per-expert
    checkpoint tensors, or None when its conversions do not split it into whole blocks."""
    from automodel_cli.components.models.hf_stream import reverted

    if len(shape) != 3 or shape[0] < 2:
        return None
    slab = shape[1] * shape[2]
    probe = torch.arange(2 * slab, dtype=torch.float64).reshape(2, shape[1], shape[2])
    try:
        pieces = reverted(model, {key: probe})
    except Exception:  # noqa: BLE001 - a conversion that cannot split a probe has no layout here
        return None
    if key in pieces or not pieces:
        return None
    found: dict[int, list[tuple[str, Block]]] = {0: [], 1: []}
    for name, piece in pieces.items():
        placed = _place(piece, probe, name)
        if placed is None:
            return None
        expert, block = placed
        found[expert].append((name, block))
    first, second = (sorted(found[e], key=lambda item: item[1].start) for e in (0, 1))
    if len(first) != len(second) or sum(_size(b.shape) for _, b in first) != slab:
        return None
    blocks = []
    for (name0, block0), (name1, block1) in zip(first, second):
        template = _template(name0, name1)
        if template is None or (block0.start, block0.shape, block0.transposed) != (
                block1.start, block1.shape, block1.transposed):
            return None
        blocks.append(Block(template, block0.start, block0.shape, block0.transposed))
    return Joined(shape[0], tuple(blocks))


def _place(piece: torch.Tensor, probe: torch.Tensor, name: str) -> tuple[int, Block] | None:
    """(expert, block) where ``piece`` sits in ``probe`` as a whole rectangle, else None."""
    if piece.dim() != 2 or piece.numel() == 0:
        return None
    first = int(piece[0, 0].item())
    expert, rest = divmod(first, probe.shape[1] * probe.shape[2])
    row, col = divmod(rest, probe.shape[2])
    for transposed, rows, cols in ((False, *piece.shape), (True, piece.shape[1], piece.shape[0])):
        region = probe[expert, row:row + rows, col:col + cols]
        if region.shape != (rows, cols):
            continue
        if torch.equal(region.t() if transposed else region, piece):
            return expert, Block(name, (row, col), (rows, cols), transposed)
    return None


def _template(name0: str, name1: str) -> str | None:
    """The key pattern of two experts' keys that differ in one index (0 and 1)."""
    spots0, spots1 = list(_INDEX.finditer(name0)), list(_INDEX.finditer(name1))
    if len(spots0) != len(spots1):
        return None
    differing = [(a, b) for a, b in zip(spots0, spots1) if a.group() != b.group()]
    if len(differing) != 1 or (differing[0][0].group(), differing[0][1].group()) != ("0", "1"):
        return None
    spot = differing[0][0]
    template = name0[:spot.start()].replace("{", "{{").replace("}", "}}") + "{expert}" \
        + name0[spot.end():].replace("{", "{{").replace("}", "}}")
    return template if template.format(expert=1) == name1 else None


def _size(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total
