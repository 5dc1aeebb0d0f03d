"""Pipeline parallelism for Hugging Face decoder-only causal LMs, on ``torch.distributed.pipelining``.

Wired into recipes through ``training/pipeline.py`` (``distributed.pp``): a rank cuts the
empty model down to its stages (``keep_rank_part``), prepares it as any model (adapters, TP,
FSDP), then runs each of its stages through a view over it (``stage_view``), so checkpoints, the
optimizer and the final save see one model per rank under the whole model's names.

What works (checked by the tests, CPU + gloo):

* ``split_points`` cuts the decoder layers into contiguous stages, balanced by count, by per-layer
  cost (optionally with the embedding's and the LM head + loss's cost) or at manual points.
* ``build_stage_module`` turns a model (any HF CausalLM whose decoder has ``embed_tokens``, a
  ``layers`` list and a final norm, also wrapped by peft) into one stage: the other layers, the
  embedding (not on the first stage) and the norm and head (not on the last) are deleted, on a
  real or a meta model. Each stage runs the decoder's *own* ``forward`` (given ``inputs_embeds``
  after the first stage), so rotary embeddings, the causal mask and packed-document masks from
  ``position_ids`` are exactly Hugging Face's for every attention implementation that forward
  supports (sdpa and eager are tested), including per-layer attention types (``layer_types``:
  sliding windows of Qwen3 or Gemma 2/3) through a per-stage copy of the decoder's config.
  The last stage computes the loss with ``components/loss/head.py``'s ``training_loss``: fused,
  rows and logits losses, and logits transforms after the head (Gemma 2 soft-capping) behave as
  in an unpipelined run.
* ``PipelineRunner`` runs one optimizer step's micro-batches (forward and backward) with GPipe,
  1F1B or interleaved 1F1B (``virtual_stages`` per rank, looped placement: rank ``r`` holds
  stages ``r, r + pp, ...``), normalising each micro-batch's loss by the step's trained tokens
  and with ``scale_grads=False``, so losses and gradients equal an unpipelined step's. The summed
  loss is broadcast from the last stage to every rank of the pipeline group.
* Tied embeddings (Qwen3 small models): the first stage's embedding and the last stage's head
  are two copies of one weight; their gradients are summed over the pipeline group after each
  step, so both copies stay equal under any optimizer.

Not supported (yet): mixture-of-experts router balance losses (each stage sees only its own
routers), vision-language models, the KV cache, the fused ``linear_ce`` distillation path,
and models whose decoder forward scales ``inputs_embeds`` after the embedding (none of the
families above: their scaling lives in the embedding module).

How a run uses it: ``training/pipeline.py`` (stages, step, forward-only validation);
``components/checkpoint/stages.py`` (checkpoints across pipeline sizes); ``hf_stream`` and
``saving`` (the final model gathered from every stage).
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from automodel_cli.components.models import structure
from automodel_cli.errors import UserError

#: Schedule names, as the future config will spell them.
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
#: Names the final norm of a decoder stack goes by (Llama/Qwen/Mistral/Gemma: ``norm``).
FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_norm")


# --------------------------------------------------------------------------- splitting the layers

def split_points(num_layers: int, stages: int, costs: Sequence[float] | None = None,
                 manual: Sequence[int] | None = None) -> list[range]:
    """The decoder layers of each stage, as contiguous ``range``\\ s covering ``0..num_layers``.

    The embedding always goes with the first stage and the final norm, LM head and loss with the
    last. ``manual`` gives the first layer of stages 1, 2, ... (``stages - 1`` increasing indices).
    Otherwise the largest stage cost is made as small as possible, the cost of a stage being the
    sum of its layers' ``costs``. Without costs the stages differ by at most one layer, and the
    stages with one more are the middle ones, then the first: the last one also computes the
    vocabulary projection and the loss, the first holds the most micro-batches' activations
    under 1F1B. ``costs`` of length
    ``num_layers + 2`` also carries the embedding's cost (first) and the head + loss's (last),
    which count towards the first and the last stage. Every stage gets at least one layer.
    """
    if stages < 1:
        raise UserError(f"Pipeline stages must be at least 1, got {stages}.", "Set the number of stages to 1 or more.")
    if stages > num_layers:
        raise UserError(f"{stages} pipeline stages need at least {stages} decoder layers; the model has {num_layers}.",
                        f"Use at most {num_layers} stages (pipeline size x virtual stages).")
    if manual is not None:
        return _manual_ranges(num_layers, stages, list(manual))
    if costs is None:
        return _ranges_by_count(num_layers, stages)
    layer_costs, first, last = _layer_costs(num_layers, costs)
    return _balanced_ranges(layer_costs, stages, first, last)


def _manual_ranges(num_layers: int, stages: int, points: list[int]) -> list[range]:
    if len(points) != stages - 1:
        raise UserError(f"{stages} pipeline stages need {stages - 1} split points; got {len(points)}: {points}.",
                        "Give the first layer of every stage after the first, in increasing order.")
    if not all(isinstance(p, int) and not isinstance(p, bool) for p in points):
        raise UserError(f"Split points must be layer indices (integers); got {points}.",
                        f"Use increasing integers between 1 and {num_layers - 1}.")
    bounds = [0, *points, num_layers]
    for index, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if end <= start:
            raise UserError(
                f"Split points {points} do not cut layers 0..{num_layers - 1} into {stages} non-empty stages "
                f"(stage {index} would start at layer {start} and end before layer {end}).",
                f"Use increasing integers between 1 and {num_layers - 1}.")
    return [range(start, end) for start, end in zip(bounds, bounds[1:])]


def _ranges_by_count(num_layers: int, stages: int) -> list[range]:
    base, extra = divmod(num_layers, stages)
    preference = [*range(1, stages - 1), 0, stages - 1] if stages > 1 else [0]
    sizes = [base + (index in preference[:extra]) for index in range(stages)]
    starts = [sum(sizes[:index]) for index in range(stages)]
    return [range(start, start + size) for start, size in zip(starts, sizes)]


def _layer_costs(num_layers: int, costs: Sequence[float]) -> tuple[list[float], float, float]:
    values = [float(c) for c in costs]
    if any(c < 0 for c in values):
        raise UserError(f"Pipeline layer costs must not be negative, got {values}.", "Give each layer's cost (>= 0).")
    if len(values) == num_layers:
        return values, 0.0, 0.0
    if len(values) == num_layers + 2:
        return values[1:-1], values[0], values[-1]
    raise UserError(f"Got {len(values)} pipeline layer costs for a model of {num_layers} decoder layers.",
                    f"Give {num_layers} costs, or {num_layers + 2} with the embedding's first and the head's last.")


def _balanced_ranges(costs: list[float], stages: int, first: float, last: float) -> list[range]:
    """Contiguous partition minimising the largest stage cost (dynamic programming; ties go to
    the partition whose stages are most even, by the sum of squared stage costs)."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(stage: int, start: int, end: int) -> float:
        return prefix[end] - prefix[start] + (first if stage == 0 else 0.0) + (last if stage == stages - 1 else 0.0)

    # best[s][e]: (max cost, sum of squares) of the first s + 1 stages covering layers 0..e-1.
    inf = (float("inf"), float("inf"))
    best = [[inf] * (n + 1) for _ in range(stages)]
    cut = [[0] * (n + 1) for _ in range(stages)]
    for end in range(1, n + 1):
        c = cost(0, 0, end)
        best[0][end] = (c, c * c)
    for s in range(1, stages):
        for end in range(s + 1, n + 1):
            for start in range(s, end):
                previous = best[s - 1][start]
                c = cost(s, start, end)
                candidate = (max(previous[0], c), previous[1] + c * c)
                if candidate < best[s][end]:
                    best[s][end], cut[s][end] = candidate, start
    ranges, end = [], n
    for s in range(stages - 1, 0, -1):
        start = cut[s][end]
        ranges.append(range(start, end))
        end = start
    ranges.append(range(0, end))
    return ranges[::-1]


# --------------------------------------------------------------------------- one stage's module

@functools.cache
def _classes() -> tuple[type, type]:
    """``(StageLayers, PipelineStageModule)``, defined on first use so that importing this module
    imports no torch."""
    import torch.nn as nn

    class StageLayers(nn.ModuleList):
        """The decoder layers one stage keeps, registered under their indices in the full model
        (``layers.4`` stays ``layers.4``: parameter names, hence checkpoints, match the full
        model's). Integer indices and slices are positions in this stage, as in a ModuleList."""

        def __init__(self, layers: dict[int, Any]) -> None:
            super().__init__()
            for index, layer in layers.items():
                self.add_module(str(index), layer)

        def _key(self, position: int) -> str:
            return list(self._modules)[position]

        def __getitem__(self, index: int | slice) -> Any:
            if isinstance(index, slice):
                return list(self._modules.values())[index]
            return self._modules[self._key(index)]

        def __setitem__(self, index: int, module: Any) -> None:
            self.add_module(self._key(index), module)

        def __delitem__(self, index: int | slice) -> None:
            raise TypeError("a pipeline stage's layers cannot be removed")

    class PipelineStageModule(nn.Module):
        """One pipeline stage of a Hugging Face causal LM (built by ``build_stage_module``)."""

        def __init__(self, model: Any, stack: Any, stage_index: int, num_stages: int, layer_range: range) -> None:
            super().__init__()
            self.model = model
            self.stage_index, self.num_stages, self.layer_range = stage_index, num_stages, layer_range
            self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
            self.__dict__["stack"] = stack  # inside self.model; not registered twice
            self.loss_spec: Any = None
            self.autocast: Callable[[], Any] | None = None
            self.num_label_tokens: Any = None

        def set_loss(self, loss_spec: Any, autocast: Callable[[], Any] | None = None) -> None:
            """The loss the last stage computes (a ``LossSpec`` or a logits loss function) and the
            autocast context of its forward."""
            self.loss_spec, self.autocast = loss_spec, autocast

        def forward(self, x: Any, attention_mask: Any = None, position_ids: Any = None, labels: Any = None) -> Any:
            return _stage_forward(self, x, attention_mask, position_ids, labels)

    return StageLayers, PipelineStageModule


def build_stage_module(model: Any, stage_index: int, num_stages: int, layer_range: range) -> Any:
    """The module of pipeline stage ``stage_index`` of ``num_stages``, made from ``model``
    (modified in place: pass a copy to keep the full model).

    It keeps the decoder layers in ``layer_range`` (the others are deleted, freeing their memory),
    the embedding on the first stage and the final norm and LM head on the last. ``forward(x,
    attention_mask=None, position_ids=None, labels=None)`` takes token ids on the first stage and
    the previous stage's hidden states on the others; the last stage returns the micro-batch's
    loss when given ``labels`` (after ``set_loss``), else the logits; the others return hidden
    states. ``.model`` is the trimmed model under its original parameter names.
    """
    import torch.nn as nn

    _, stack = structure.decoder_stack(model)
    total = _layer_count(stack)
    if not (0 <= stage_index < num_stages):
        raise UserError(f"Pipeline stage {stage_index} does not exist in a pipeline of {num_stages} stages.",
                        f"Use a stage index from 0 to {num_stages - 1}.")
    if not layer_range or layer_range.start < 0 or layer_range.stop > total or layer_range.step != 1:
        raise UserError(f"Pipeline stage {stage_index} cannot hold layers {layer_range.start}..{layer_range.stop - 1}: "
                        f"the model has layers 0..{total - 1}.",
                        "Take the ranges from split_points(num_layers, stages).")
    first, last = stage_index == 0, stage_index == num_stages - 1
    norm_name = next((name for name in FINAL_NORM_NAMES if isinstance(getattr(stack, name, None), nn.Module)), None)
    if norm_name is None:
        raise UserError(f"Cannot find the final norm of {type(structure.unwrap(model)).__name__}'s decoder "
                        f"(none of {', '.join(FINAL_NORM_NAMES)}).",
                        "Pipeline parallelism needs a decoder laid out like Llama's; set pp=1 for this model.")
    kept = {index: _layer(stack, index) for index in layer_range}
    stage_layers, stage_module = _classes()
    stack.layers = stage_layers(kept)
    stack.config = _stage_config(stack.config, layer_range)
    if not first:
        stack.embed_tokens = None
    if not last:
        setattr(stack, norm_name, nn.Identity())
        _, head_name = structure.output_head(model)
        if head_name is not None:
            parent, _, attribute = head_name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attribute, None)
    return stage_module(model, stack, stage_index, num_stages, layer_range)


def _layer_count(stack: Any) -> int:
    """Decoder layers of the whole model (a rank's part keeps the others' indices)."""
    stage_layers, _ = _classes()
    if isinstance(stack.layers, stage_layers):
        return max(int(key) for key in stack.layers._modules) + 1 if len(stack.layers) else 0
    return len(stack.layers)


def _layer(stack: Any, index: int) -> Any:
    """Decoder layer ``index`` of the whole model (also in a rank's part)."""
    stage_layers, _ = _classes()
    if isinstance(stack.layers, stage_layers):
        if str(index) not in stack.layers._modules:
            raise UserError(f"This pipeline rank does not hold decoder layer {index}.",
                            "Build a stage only from the layers its rank keeps (keep_rank_part).")
        return stack.layers._modules[str(index)]
    return stack.layers[index]


# --------------------------------------------------------------------------- a rank's stages

def rank_stages(pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    """The stage indices pipeline rank ``pp_rank`` runs (looped placement): ``r, r + pp, ...``."""
    return [pp_rank + v * pp for v in range(virtual_stages)]


def keep_rank_part(model: Any, ranges: Sequence[range], stages: Sequence[int]) -> None:
    """Trim ``model`` (in place, also on the meta device) to what a pipeline rank running
    ``stages`` holds: the decoder layers of those stages (under their original indices), the
    embedding when it runs the first stage, the final norm and LM head when it runs the last.
    The config is left whole: it describes the model that checkpoints and the final output hold.
    Call ``stage_view`` for each stage's module once the model is prepared."""
    import torch.nn as nn

    _, stack = structure.decoder_stack(model)
    num_stages = len(ranges)
    kept = {index: _layer(stack, index) for stage in stages for index in ranges[stage]}
    stage_layers, _ = _classes()
    stack.layers = stage_layers(dict(sorted(kept.items())))
    if 0 not in stages:
        stack.embed_tokens = nn.Identity()  # not None: peft asks the model for its input embeddings
    if num_stages - 1 not in stages:
        norm_name = next((n for n in FINAL_NORM_NAMES if isinstance(getattr(stack, n, None), nn.Module)), None)
        if norm_name is not None:
            setattr(stack, norm_name, nn.Identity())
        _, head_name = structure.output_head(model)
        if head_name is not None:
            parent, _, attribute = head_name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attribute, None)


def stage_view(model: Any, stage_index: int, num_stages: int, layer_range: range) -> Any:
    """The module of one of this rank's stages over ``model`` (a rank's part from
    ``keep_rank_part``, prepared: adapters, FSDP): ``build_stage_module`` applied to a view that
    copies only the modules on the path from the root to the decoder (their child tables), so
    the stages share every layer, parameter and FSDP hook with ``model``, which keeps its own
    layers, names and state dict (checkpoints and the optimizer see one model per rank)."""
    prefix, _ = structure.decoder_stack(model)
    view = _shallow(model)
    parent = view
    for part in prefix.rstrip(".").split(".") if prefix else []:
        child = _shallow(parent._modules[part])
        parent._modules[part] = child
        parent = child
    return build_stage_module(view, stage_index, num_stages, layer_range)


def _shallow(module: Any) -> Any:
    """A copy of ``module`` with its own tables of children, parameters and buffers (the
    entries themselves shared), so replacing a child of the copy leaves ``module`` intact."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    if isinstance(module, FSDPModule):
        # The module's own class: the copy shares the FSDP hooks (they are in its hook tables)
        # but is not an FSDP module itself, whose state would be looked up by identity.
        cls = next(base for base in cls.__bases__ if not issubclass(base, FSDPModule))
    clone = object.__new__(cls)  # not copy.copy: FSDP's module classes re-run __init__ there
    clone.__dict__.update(module.__dict__)
    for table in ("_modules", "_parameters", "_buffers"):
        clone.__dict__[table] = type(module.__dict__[table])(module.__dict__[table])
    return clone


def _stage_config(config: Any, layer_range: range) -> Any:
    """A copy of the decoder's config for one stage: its number of layers and, for models that
    pick each layer's attention type by its position in the loop (``config.layer_types[i]``),
    the kept layers' types. The layers themselves keep the full config (their own indices)."""
    stage = copy.copy(config)
    stage.num_hidden_layers = len(layer_range)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) >= layer_range.stop:
        stage.layer_types = [layer_types[i] for i in layer_range]
    return stage


def _stage_forward(stage: Any, x: Any, attention_mask: Any, position_ids: Any, labels: Any) -> Any:
    """Hidden states (not the last stage), the loss (the last, given labels) or the logits."""
    inputs = {"input_ids" if stage.is_first else "inputs_embeds": x}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    if not stage.is_last:
        return stage.stack(**inputs, use_cache=False).last_hidden_state
    if labels is None:
        return stage.model(**inputs, use_cache=False).logits
    from automodel_cli.components.loss.head import training_loss

    if stage.loss_spec is None or stage.num_label_tokens is None:
        raise RuntimeError("the last pipeline stage needs set_loss() and num_label_tokens before a loss")
    return training_loss(stage.model, inputs, labels, stage.num_label_tokens, stage.loss_spec, stage.autocast)


# --------------------------------------------------------------------------- one optimizer step

def pad_micro_batches(micro_batches: Sequence[dict[str, Any]], shape: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """The micro-batches at one shape (the most rows and the longest row of any, or ``shape``
    (rows, length) when that is larger: pipelines of different data-parallel ranks must run the
    same shapes, since their stages' FSDP collectives meet) and with the same
    keys, since pipeline stages exchange fixed-size buffers. Added positions come after every real
    token (causal attention keeps them out of every real position) and added rows are whole dummy
    sequences; both have labels -100, so the loss and the gradients are those of the unpadded
    batches. Added positions are attended (mask 1) and continue ``position_ids``, so no row is
    fully masked (a fully masked softmax row would turn the gradients into NaN).

    Packed micro-batches (``position_ids`` that restart, no mask) stay packed: Hugging Face's
    forward ignores position ids for the mask once there is an ``attention_mask``, so when some
    micro-batches are packed, the others' masks are dropped where that changes no real token
    (right padding only: causal attention never looks ahead) and refused otherwise."""
    import torch

    from automodel_cli.components.loss.targets import IGNORE_INDEX

    rows = max(int(mb["input_ids"].shape[0]) for mb in micro_batches)
    length = max(int(mb["input_ids"].shape[1]) for mb in micro_batches)
    if shape is not None:
        rows, length = max(rows, int(shape[0])), max(length, int(shape[1]))
    keys = {key for mb in micro_batches for key in mb} & {"attention_mask", "position_ids"}
    if keys == {"attention_mask", "position_ids"} and any(mb.get("attention_mask") is None for mb in micro_batches):
        if not all(_right_padding_only(mb.get("attention_mask")) for mb in micro_batches):
            raise ValueError("micro-batches mix packed position_ids with attention masks that are not right padding")
        keys = {"position_ids"}
    padded = []
    for mb in micro_batches:
        ids = mb["input_ids"]
        b, t = ids.shape
        out = {"input_ids": _pad(ids, rows, length, 0), "labels": _pad(mb["labels"], rows, length, IGNORE_INDEX)}
        if "attention_mask" in keys:
            mask = mb.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask
            out["attention_mask"] = _pad(mask, rows, length, 1)
        if "position_ids" in keys:
            positions = mb.get("position_ids")
            if positions is None:
                positions = torch.arange(t, device=ids.device)
            positions = positions.expand(b, t)
            continued = positions[:, -1:] + torch.arange(1, length - t + 1, device=ids.device)
            positions = torch.cat([positions, continued], dim=1)
            extra = torch.arange(length, device=ids.device).expand(rows - b, length)
            out["position_ids"] = torch.cat([positions, extra.to(positions.dtype)], dim=0)
        padded.append(out)
    return padded


def _right_padding_only(mask: Any) -> bool:
    """True when every row of ``mask`` (or None) is ones followed by zeros."""
    if mask is None:
        return True
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def _pad(tensor: Any, rows: int, length: int, value: int) -> Any:
    import torch.nn.functional as F

    return F.pad(tensor, (0, length - tensor.shape[1], 0, rows - tensor.shape[0]), value=value)


class PipelineRunner:
    """Forward and backward of one optimizer step's micro-batches through this rank's stages.

    ``stages`` are this rank's ``PipelineStageModule``\\ s (one, or ``virtual_stages`` for the
    interleaved schedule, in increasing stage order), ``group`` the pipeline process group,
    ``schedule`` one of ``SCHEDULES``. Call ``step(micro_batches, num_label_tokens)``.
    """

    def __init__(self, stages: Sequence[Any], group: Any, schedule: str, device: Any,
                 loss_spec: Any, autocast: Callable[[], Any] | None = None) -> None:
        import torch.distributed as dist

        if schedule not in SCHEDULES:
            raise UserError(f"Unknown pipeline schedule {schedule!r}.", f"Use one of: {', '.join(SCHEDULES)}.")
        size = dist.get_world_size(group)
        rank = dist.get_rank(group)
        expected = [rank + v * size for v in range(len(stages))]
        if [s.stage_index for s in stages] != expected:
            raise UserError(f"Pipeline rank {rank} of {size} holds stages {[s.stage_index for s in stages]}; "
                            f"the schedule expects {expected}.",
                            "Build stage r + v * pp for each virtual stage v on pipeline rank r.")
        if schedule != "interleaved_1f1b" and len(stages) != 1:
            raise UserError(f"The {schedule} schedule runs one stage per rank; this rank holds {len(stages)}.",
                            "Use interleaved_1f1b for several (virtual) stages per rank.")
        for stage in stages:
            stage.set_loss(loss_spec, autocast)
        self.stages, self.group, self.schedule_name, self.device = list(stages), group, schedule, device
        self._schedules: OrderedDict[tuple, Any] = OrderedDict()
        self._tied = _tied_head_weight(self.stages)

    @property
    def tied_head_copy(self) -> Any:
        """This rank's LM-head copy of an embedding tied to it on another stage, or None."""
        return self._tied[1] if self._tied is not None else None

    @property
    def has_first(self) -> bool:
        return any(s.is_first for s in self.stages)

    @property
    def has_last(self) -> bool:
        return any(s.is_last for s in self.stages)

    def _schedule(self, shape: tuple, count: int) -> Any:
        """A schedule (and its ``PipelineStage``\\ s) for micro-batches of one shape: the stages'
        buffers are sized on the first step, so each new shape gets its own (the last few kept)."""
        from torch.distributed import pipelining

        key = (shape, count)
        if key in self._schedules:
            self._schedules.move_to_end(key)
            return self._schedules[key]
        stages = [pipelining.PipelineStage(s, s.stage_index, s.num_stages, self.device, group=self.group)
                  for s in self.stages]
        kwargs = {"n_microbatches": count, "loss_fn": _returned_loss, "scale_grads": False}
        if self.schedule_name == "gpipe":
            schedule = pipelining.ScheduleGPipe(stages[0], **kwargs)
        elif self.schedule_name == "1f1b":
            schedule = pipelining.Schedule1F1B(stages[0], **kwargs)
        else:
            schedule = pipelining.ScheduleInterleaved1F1B(stages, **kwargs)
        self._schedules[key] = schedule
        while len(self._schedules) > 16:
            self._schedules.popitem(last=False)
        return schedule

    def step(self, micro_batches: Sequence[dict[str, Any]], num_label_tokens: int | Any,
             shape: tuple[int, int] | None = None) -> Any:
        """Run forward and backward of ``micro_batches`` (each ``input_ids`` and ``labels`` [B, T],
        optionally ``attention_mask`` / ``position_ids``; the same on every rank of the group)
        and return the sum of their losses, each normalised by ``num_label_tokens`` (the step's
        trained tokens), on every rank of the group. Gradients accumulate into the parameters.
        ``shape``: (rows, length) to pad every micro-batch to at least (see ``pad_micro_batches``)."""
        import torch
        import torch.distributed as dist

        padded = pad_micro_batches(micro_batches, shape)
        batch = {key: torch.cat([mb[key] for mb in padded]).to(self.device) for key in padded[0]}
        schedule = self._schedule(tuple(padded[0]["input_ids"].shape) + tuple(sorted(batch)), len(padded))
        for stage in self.stages:
            stage.num_label_tokens = num_label_tokens
        kwargs = {key: value for key, value in batch.items() if key != "input_ids"}
        args = (batch["input_ids"],) if self.has_first else ()
        losses: list[Any] = []
        schedule.step(*args, target=batch["labels"] if self.has_last else None,
                      losses=losses if self.has_last else None, return_outputs=False, **kwargs)
        total = torch.stack([loss.detach().float() for loss in losses]).sum() if self.has_last \
            else torch.zeros((), device=self.device)
        last_rank = dist.get_global_rank(self.group, (self.stages[0].num_stages - 1) % dist.get_world_size(self.group))
        dist.broadcast(total, src=last_rank, group=self.group)
        if self._tied is not None:
            _sum_tied_gradient(self._tied, self.group, self.device)
        return total


def _returned_loss(output: Any, _target: Any) -> Any:
    """The schedule's loss function: the last stage's forward already returned the loss."""
    return output


def _tied_head_weight(stages: list[Any]) -> tuple[Any, Any] | None:
    """``(embedding weight or None, head weight or None)`` of this rank when the model ties them
    and they live on different stages (else None): the tied weight's gradient is split in two."""
    config = structure.text_config(getattr(structure.unwrap(stages[0].model), "config", None))
    if not getattr(config, "tie_word_embeddings", False) or stages[0].num_stages == 1:
        return None
    embedding = next((s.stack.embed_tokens.weight for s in stages if s.is_first), None)
    head = next((structure.output_head(s.model)[0].weight for s in stages if s.is_last), None)
    return embedding, head


def _sum_tied_gradient(tied: tuple[Any, Any], group: Any, device: Any) -> None:
    """Sum the tied embedding/head weight's gradients of the first and the last stage over the
    pipeline group (every rank takes part; ranks with neither contribute zeros). Under FSDP the
    two copies are sharded alike over the same data-parallel ranks, so the local shards add."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    def local(tensor: Any) -> Any:
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor

    embedding, head = tied
    owned = [w for w in (embedding, head) if w is not None]
    trainable = torch.tensor([float(any(w.requires_grad for w in owned))], device=device)
    dist.all_reduce(trainable, group=group)
    if not trainable.item():  # frozen (LoRA): nothing to sum
        return
    shape = next((local(w).shape for w in owned), None)
    shape_t = torch.tensor(list(shape) if shape is not None else [0, 0], device=device)
    dist.all_reduce(shape_t, op=dist.ReduceOp.MAX, group=group)
    grad = torch.zeros(tuple(int(x) for x in shape_t), device=device)
    for weight in owned:
        if weight.grad is not None:
            grad += local(weight.grad)
    dist.all_reduce(grad, group=group)
    for weight in owned:
        if weight.grad is None:
            summed = grad.to(weight.dtype)
            weight.grad = (DTensor.from_local(summed, weight.device_mesh, weight.placements, shape=weight.shape,
                                              stride=weight.stride()) if isinstance(weight, DTensor) else summed)
        else:
            local(weight.grad).copy_(grad)
