"""Pipeline parallelism in a run (``distributed.pp``): the pieces finetune and pretrain share.

The component (``components/distributed/pipeline.py``) splits a decoder into stages and runs a
step's micro-batches through them with ``torch.distributed.pipelining``; here a run uses it:

* ``check``: what pipeline parallelism does not combine with, refused before anything loads;
* ``PipelinePlan``: the stages (``pp x virtual stages``, balanced by a per-layer cost estimate or
  at ``distributed.pp_split``) and the ones this rank runs; ``trim`` cuts the empty model down to
  this rank's part before adapters, FSDP and the weights are applied, so a rank only ever holds
  (and reads from the safetensors) its own layers, under the full model's parameter names;
* ``Pipeline``: over the prepared model, one view per stage and the schedule's runner. ``step``
  runs one optimizer step's micro-batches of this data-parallel rank (forward and backward) and
  returns their summed loss on every rank of the pipeline; ``logits`` runs a forward-only pass
  for validation, stage after stage, and hands the logits to every rank of the pipeline.

Every rank of a pipeline (one per stage, the same data-parallel coordinates) reads the same
micro-batches; the loss is normalised by the step's trained tokens as without pipelining, so
the per-step loss and the gradients are the single-process ones. Checkpoints hold each stage's
parameters under their own names: a checkpoint saved with one ``pp`` resumes with another.
"""

from __future__ import annotations

from typing import Any

from automodel_cli.errors import UserError

#: Recipes whose steps run through a pipeline.
PP_RECIPES = ("finetune", "pretrain")


def check(recipe: str, cfg: Any) -> None:
    """UserError for ``distributed.pp > 1`` with what the pipeline cannot run (before loading)."""
    pp = cfg.distributed.pp
    schedule = cfg.distributed.pp_schedule
    virtual = cfg.distributed.pp_virtual_stages
    if pp == 1:
        if virtual not in (None, 1) or cfg.distributed.pp_split is not None:
            key = "pp_virtual_stages" if virtual not in (None, 1) else "pp_split"
            raise UserError(f"distributed.{key} is set but distributed.pp=1: there is no pipeline to split.",
                            f"Set distributed.pp to the number of pipeline stages' rank groups, or remove distributed.{key}.")
        return
    if recipe not in PP_RECIPES:
        raise UserError(f"distributed.pp={pp} (pipeline parallelism) is supported by {' and '.join(PP_RECIPES)}, "
                        f"not by `automodel {recipe}`.", "Set distributed.pp=1 for this command.")
    if virtual not in (None, 1) and schedule != "interleaved_1f1b":
        raise UserError(f"distributed.pp_virtual_stages={virtual} needs distributed.pp_schedule=interleaved_1f1b; "
                        f"the {schedule} schedule runs one stage per rank.",
                        "Set distributed.pp_schedule=interleaved_1f1b, or distributed.pp_virtual_stages=1.")
    if cfg.train.compile:
        raise UserError(f"train.compile=true does not combine with distributed.pp={pp} yet.",
                        "Set train.compile=false for a pipelined run.")


def virtual_stages(cfg: Any) -> int:
    """Stages per pipeline rank: ``distributed.pp_virtual_stages``, by default 2 for the
    interleaved schedule and 1 for the others."""
    chosen = cfg.distributed.pp_virtual_stages
    if chosen is not None:
        return int(chosen)
    return 2 if cfg.distributed.pp_schedule == "interleaved_1f1b" else 1


class PipelinePlan:
    """The stages of a ``pp``-rank pipeline and the ones pipeline rank ``pp_rank`` runs."""

    def __init__(self, cfg: Any, pp: int, pp_rank: int) -> None:
        self.pp, self.pp_rank, self.virtual = pp, pp_rank, virtual_stages(cfg)
        self.num_stages = pp * self.virtual
        self.schedule = cfg.distributed.pp_schedule
        self.manual = cfg.distributed.pp_split
        self.ranges: list[range] = []
        #: kept name -> name in the weights, for a tied LM head whose embedding is on another stage
        self.tied: dict[str, str] = {}

    @property
    def stages(self) -> list[int]:
        from automodel_cli.components.distributed.pipeline import rank_stages

        return rank_stages(self.pp_rank, self.pp, self.virtual)

    def trim(self, model: Any) -> dict[str, str]:
        """Split the layers of ``model`` (whole, usually on the meta device) into the stages and
        cut it down to this rank's part; returns {kept name -> name in the weights} for a tied
        LM head whose embedding lives on another stage (the checkpoint stores it once)."""
        from automodel_cli.components.checkpoint.state import tied_aliases
        from automodel_cli.components.distributed.pipeline import keep_rank_part, split_points
        from automodel_cli.components.models import structure

        _, stack = structure.decoder_stack(model)
        layers = len(stack.layers)
        try:
            self.ranges = split_points(layers, self.num_stages, costs=_costs(model, stack), manual=self.manual)
        except UserError as error:
            raise UserError(f"distributed.pp={self.pp} x {self.virtual} stage(s) per rank: {error.message}",
                            error.hint) from None
        tied = tied_aliases(model)
        keep_rank_part(model, self.ranges, self.stages)
        kept = {name for name, _ in model.named_parameters()}
        self.tied = {alias: first for alias, first in tied.items() if alias in kept and first not in kept}
        return self.tied

    def describe(self) -> str:
        parts = []
        for stage, layers in enumerate(self.ranges):
            extra = (" + embedding" if stage == 0 else "") + (" + norm, head, loss" if stage == self.num_stages - 1 else "")
            parts.append(f"stage {stage}: layers {layers.start}-{layers.stop - 1}{extra} (rank {stage % self.pp})")
        return (f"pipeline: {self.num_stages} stages on {self.pp} ranks, schedule {self.schedule}; "
                + "; ".join(parts))


def _costs(model: Any, stack: Any) -> list[float]:
    """Per-layer cost estimate for balancing the stages, with the embedding's first and the LM
    head + loss's last: matmul parameters, proportional to the FLOPs per token (an embedding
    lookup does no matmul)."""
    from automodel_cli.components.models import structure

    layer_cost = [float(sum(p.numel() for p in layer.parameters())) for layer in stack.layers]
    head, _ = structure.output_head(model)
    head_cost = float(head.weight.numel()) if head is not None and getattr(head, "weight", None) is not None else 0.0
    return [0.0, *layer_cost, head_cost]


class Pipeline:
    """The stages of this rank over the prepared model, and the schedule that runs them."""

    def __init__(self, plan: PipelinePlan, model: Any, group: Any, device: Any, loss_spec: Any,
                 autocast: Any) -> None:
        from automodel_cli.components.distributed.pipeline import PipelineRunner, stage_view

        self.plan, self.group, self.device = plan, group, device
        self.views = [stage_view(model, stage, plan.num_stages, plan.ranges[stage]) for stage in plan.stages]
        self.runner = PipelineRunner(self.views, group, plan.schedule, device, loss_spec, autocast)

    def step(self, micro_batches: list[dict[str, Any]], label_tokens: int, rows: int, longest: int) -> Any:
        """Forward and backward of this data-parallel rank's micro-batches of one step (collated
        batches: ``input_ids``, ``labels``, masks); their summed loss, on every pipeline rank.

        ``rows`` (the micro-batch size) and ``longest`` (the step's longest sample, on every
        rank) fix the shape all pipelines of the step run: every data-parallel rank's stages
        must run the same shapes (their FSDP collectives meet), and a new shape costs the
        schedule a shape-inference pass, so lengths are rounded up to a multiple of
        ``LENGTH_MULTIPLE`` (a few shapes per run)."""
        inputs = [{key: value for key, value in batch.items() if key in _STAGE_INPUTS} for batch in micro_batches]
        length = -(-longest // LENGTH_MULTIPLE) * LENGTH_MULTIPLE
        return self.runner.step(inputs, label_tokens, shape=(rows, length))

    def uncounted(self) -> list[Any]:
        """Parameters the gradient norm must not count: the LM head's copy of a tied embedding
        that lives on another stage (its gradient equals the embedding's after each step)."""
        copy = self.runner.tied_head_copy
        return [copy] if copy is not None else []

    def evaluation_model(self, model: Any) -> Any:
        """A module to validate with: called like the model (``(**inputs, use_cache=False)``),
        it returns an object with ``.logits`` (``logits``); ``eval()``/``train()`` reach ``model``."""
        import types

        import torch.nn as nn

        pipeline = self

        class PipelinedForward(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, **inputs: Any) -> Any:
                inputs.pop("use_cache", None)
                return types.SimpleNamespace(logits=pipeline.logits(inputs))

        return PipelinedForward()

    def logits(self, inputs: dict[str, Any]) -> Any:
        """Forward only, stage after stage: the last stage's logits on every rank of the pipeline
        (validation). ``inputs``: ``input_ids`` and optionally ``attention_mask``/``position_ids``."""
        import torch
        import torch.distributed as dist

        pp, group = self.plan.pp, self.group
        mine = dict(zip(self.plan.stages, self.views))
        kwargs = {key: value for key, value in inputs.items() if key in ("attention_mask", "position_ids")}
        x = inputs["input_ids"]
        last = self.plan.num_stages - 1
        with torch.no_grad():
            for stage in range(self.plan.num_stages):
                owner = stage % pp
                if stage > 0 and (stage - 1) % pp != owner:
                    source = (stage - 1) % pp
                    if self.plan.pp_rank == source:
                        _send(x, dist.get_global_rank(group, owner), group)
                    elif self.plan.pp_rank == owner:
                        x = _receive(dist.get_global_rank(group, source), group, self.device)
                if stage in mine:
                    x = mine[stage](x, **kwargs)
            result = x if self.plan.pp_rank == last % pp else None
            return _broadcast(result, dist.get_global_rank(group, last % pp), group, self.device)


#: Micro-batch lengths are padded up to a multiple of this (fewer distinct pipeline shapes).
LENGTH_MULTIPLE = 64
#: Batch keys a stage's forward takes (the others: counts for the loss's normaliser).
_STAGE_INPUTS = ("input_ids", "labels", "attention_mask", "position_ids")
_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _header(tensor: Any, device: Any) -> Any:
    """Rank, shape and dtype of ``tensor`` as 8 integers (what the receiver allocates)."""
    import torch

    dtype = _DTYPES.index(str(tensor.dtype).removeprefix("torch."))
    return torch.tensor([tensor.dim(), *tensor.shape, dtype] + [0] * (6 - tensor.dim()), dtype=torch.int64,
                        device=device)


def _empty(header: Any, device: Any) -> Any:
    import torch

    dims = int(header[0])
    return torch.empty([int(v) for v in header[1:1 + dims]], dtype=getattr(torch, _DTYPES[int(header[1 + dims])]),
                       device=device)


def _send(tensor: Any, destination: int, group: Any) -> None:
    import torch.distributed as dist

    dist.send(_header(tensor, tensor.device), destination, group=group)
    dist.send(tensor.contiguous(), destination, group=group)


def _receive(source: int, group: Any, device: Any) -> Any:
    import torch
    import torch.distributed as dist

    header = torch.zeros(8, dtype=torch.int64, device=device)
    dist.recv(header, source, group=group)
    tensor = _empty(header, device)
    dist.recv(tensor, source, group=group)
    return tensor


def _broadcast(tensor: Any, source: int, group: Any, device: Any) -> Any:
    """``tensor`` (given on global rank ``source`` only) on every rank of ``group``."""
    import torch
    import torch.distributed as dist

    sending = dist.get_rank() == source
    header = _header(tensor, device) if sending else torch.zeros(8, dtype=torch.int64, device=device)
    dist.broadcast(header, source, group=group)
    tensor = tensor.contiguous() if sending else _empty(header, device)
    dist.broadcast(tensor, source, group=group)
    return tensor
