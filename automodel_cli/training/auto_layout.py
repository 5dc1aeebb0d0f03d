"""The automatic parallel layout of a configured job (``distributed.auto=true``).

``components/training/layout.py`` chooses pp, dp_replicate, dp_shard, cp, tp, ep, the
micro-batch and activation checkpointing from plain values; this module reads those values from
a resolved config and writes the choice back into it. The launcher calls ``auto_layout`` where it
resolves the mesh (``components/launch/start.py``), before the config is frozen, so a local run,
a Slurm or k8s job, ``--dry-run`` and ``automodel plan`` make the same choice, and the processes
read concrete sizes from the frozen config: they never choose again.

What the choice is made from:

* the model: its config.json, read offline as the memory plan reads it;
* the run: ``launch.nodes`` x processes per node, ``data.max_length``, ``train.global_batch_size``
  (kept as configured), and the memory plan's ``Setup`` of the run (peft, dtype, loss, padding;
  ``training/memory_plan.py``);
* the hardware: the memory plan's ``Target`` (``launch.device_memory_gib``, this machine's GPU or
  available host memory); the speed of this machine's GPU by name, of a cluster job's GPUs the
  H100's (their name is not known here); ``train.peak_tflops`` replaces the peak;
* what the user fixed: a layout key set on the command line or in a YAML file (not a default,
  the recipe's or a preset's) keeps its value; only the others are chosen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from automodel_cli.components.distributed.mesh import MeshShape
from automodel_cli.components.launch.preflight import context_parallel_problems, offline_config
from automodel_cli.components.training.flops import lookup_peak
from automodel_cli.components.training.layout import (CHECKPOINTING, HARDWARE, Candidate, Hardware, Layout,
                                                       choose_layout, describe)
from automodel_cli.components.training.memory import checkpointing_mode
from automodel_cli.components.training.memory_plan import Architecture, gib
from automodel_cli.config.resolve import COMMAND_LINE
from automodel_cli.config.schema import set_dotted
from automodel_cli.config.yaml_io import Source
from automodel_cli.errors import UserError
from automodel_cli.training.memory_plan import Target, launch_target, setup_from_config

#: Where the chosen values come from, as ``--dry-run`` and ``automodel config`` print sources.
SOURCE = Source("automatic layout (distributed.auto=true)")
#: Layout field -> the config key that sets it.
CONFIG_KEYS = {"pp": "distributed.pp", "dp_replicate": "distributed.dp_replicate",
               "dp_shard": "distributed.dp_shard", "cp": "distributed.cp", "tp": "distributed.tp",
               "ep": "distributed.ep", "micro_batch": "train.micro_batch_size"}
CHECKPOINTING_KEY = "train.activation_checkpointing"
SCHEDULE_KEY, VIRTUAL_STAGES_KEY = "distributed.pp_schedule", "distributed.pp_virtual_stages"
#: Model chunks per pipeline rank tried: 1 (1F1B) and 2 (interleaved 1F1B).
VIRTUAL_STAGES = (1, 2)
#: The dimensions the choice may use, before the model and recipe rule some out.
DIMENSIONS = ("pp", "dp", "cp", "tp", "ep")


@dataclass
class AutoLayout:
    """The choice, the candidates it was made among, and what it set."""

    chosen: Candidate
    candidates: list[Candidate]
    settings: dict[str, Any]  # dotted key -> value written into the config
    fixed: dict[str, Any]  # dotted key -> value the user set (kept)
    excluded: dict[str, str]  # dimension -> why it was not considered
    header: str

    def lines(self) -> list[str]:
        lines = [self.header]
        if self.fixed:
            lines.append("kept as set: " + ", ".join(f"{key}={value}" for key, value in self.fixed.items()))
        lines += [f"not considered: {name} ({reason})" for name, reason in self.excluded.items()]
        lines += describe(self.candidates, self.chosen)
        lines.append("applied: " + " ".join(f"{key}={_text(value)}" for key, value in self.settings.items()))
        return lines

    def as_dict(self) -> dict[str, Any]:
        time = self.chosen.time
        return {"layout": layout_settings(self.chosen.layout), "applied": self.settings, "fixed": self.fixed,
                "not_considered": self.excluded, "peak_bytes": self.chosen.memory, "phase": self.chosen.phase,
                "step_seconds": time.total, "step_terms": time.terms(), "candidates": len(self.candidates),
                "fitting": sum(c.fits for c in self.candidates), "lines": self.lines()}


def _text(value: Any) -> str:
    return "null" if value is None else str(value)


def auto_layout(cfg: Any, recipe: str, *, nodes: int, processes_per_node: int, local: bool,
                registries: Any = None) -> AutoLayout | None:
    """With ``distributed.auto=true``: choose the layout of ``nodes x processes_per_node``
    processes, write it into ``cfg`` and return it; None otherwise. ``local``: the processes run
    on this machine (its GPU or memory decides), else on a cluster."""
    if not cfg.get("distributed.auto"):
        return None
    choice = choose(cfg, recipe, nodes=nodes, processes_per_node=processes_per_node, local=local,
                    registries=registries)
    for dotted, value in choice.settings.items():
        set_dotted(cfg.tree, dotted, value)
        cfg.sources[dotted] = SOURCE
    return choice


def choose(cfg: Any, recipe: str, *, nodes: int, processes_per_node: int, local: bool,
           registries: Any = None) -> AutoLayout:
    """The layout ``auto_layout`` applies (the config is not changed)."""
    if recipe == "benchmark":
        raise UserError("distributed.auto=true chooses the layout of a training run; `automodel benchmark` "
                        "measures the layout it is given.",
                        "Set the sizes (distributed.tp=..., ...) or take them from `automodel plan finetune ... "
                        "distributed.auto=true`.")
    config = offline_config(cfg)
    arch = Architecture.from_config(config) if config is not None else None
    if arch is None:
        raise UserError(f"distributed.auto=true needs the sizes of the model {cfg.get('model.path')!r} from its "
                        "config.json, and none is on this machine (a local directory, a preset or the Hugging Face "
                        "cache) with the fields of a decoder (hidden_size, ...).",
                        "Download the model first, point model.path at a directory holding its config.json, or "
                        "set the layout yourself (distributed.tp=..., distributed.dp_shard=...).")
    seq_len, global_batch = cfg.get("data.max_length"), cfg.get("train.global_batch_size")
    if not isinstance(seq_len, int) or not isinstance(global_batch, int):
        raise UserError(f"distributed.auto=true needs data.max_length and train.global_batch_size, and the "
                        f"`{recipe}` recipe's config has data.max_length={seq_len}, "
                        f"train.global_batch_size={global_batch}.",
                        "Set both, or set the layout yourself (distributed.tp=..., distributed.dp_shard=...).")
    target = launch_target(cfg, local=local, processes_per_node=processes_per_node)
    hardware = hardware_for(cfg, target)
    base = replace(setup_from_config(cfg, recipe, MeshShape(1, 1, 1), target, registries),
                   sequence_parallel=bool(cfg.get("distributed.sequence_parallel")))
    fixed = {key: cfg.get(key) for key in (*CONFIG_KEYS.values(), CHECKPOINTING_KEY, SCHEDULE_KEY, VIRTUAL_STAGES_KEY)
             if user_set(cfg, key) and not (key == "distributed.dp_shard" and cfg.get(key) == -1)}
    sizes = {name: fixed[key] for name, key in CONFIG_KEYS.items() if key in fixed}
    excluded = {name: reason for name, reason in excluded_dimensions(recipe, cfg, config, arch, registries).items()
                if name not in sizes}
    checkpointing = ((checkpointing_mode(fixed[CHECKPOINTING_KEY]),) if CHECKPOINTING_KEY in fixed
                     else CHECKPOINTING)
    best, candidates = choose_layout(
        arch, nodes=nodes, gpus_per_node=processes_per_node, seq_len=seq_len, global_batch=global_batch,
        hardware=hardware, base=base, capacity=target.capacity,
        allowed=[name for name in DIMENSIONS if name not in excluded], checkpointing=checkpointing,
        virtual_stages=virtual_stages_to_try(fixed), fixed=sizes)
    settings = {key: value for key, value in layout_settings(best.layout).items() if key not in fixed}
    capacity = target.capacity if target.capacity is not None else hardware.memory
    where = (target.description if target.capacity is not None
             else f"the {hardware.name}'s; set launch.device_memory_gib for yours")
    header = (f"automatic layout (distributed.auto=true): {nodes} node(s) x {processes_per_node} process(es) of "
              f"{hardware.name}, {gib(capacity)} per process ({where}); {global_batch} sequences x {seq_len} "
              f"tokens per step, {base.peft if base.peft != 'none' else 'full fine-tuning'}")
    return AutoLayout(best, candidates, settings, fixed, excluded, header)


def user_set(cfg: Any, dotted: str) -> bool:
    """``dotted`` was given on the command line or in a YAML file (``-c``, TARGET, ``automodel
    launch FILE``), not left to the defaults, the recipe or a preset."""
    source = cfg.source_of(dotted)
    if source is None:
        return False
    return source.layer.startswith(COMMAND_LINE) or (source.file is not None and source.layer == source.file)


def virtual_stages_to_try(fixed: dict[str, Any]) -> tuple[int, ...]:
    """Model chunks per pipeline rank to try: the user's schedule decides when given."""
    schedule, stages = fixed.get(SCHEDULE_KEY), fixed.get(VIRTUAL_STAGES_KEY)
    if schedule == "interleaved_1f1b":
        return (stages or 2,)
    if schedule is not None:  # gpipe or 1f1b: one chunk per rank
        return (1,)
    return (stages,) if stages else VIRTUAL_STAGES


def layout_settings(layout: Layout) -> dict[str, Any]:
    """The config keys that make a run use ``layout``; the pipeline schedule only with pp > 1."""
    settings: dict[str, Any] = {key: getattr(layout, name) for name, key in CONFIG_KEYS.items()}
    settings[CHECKPOINTING_KEY] = layout.activation_checkpointing
    if layout.pp > 1:
        settings[SCHEDULE_KEY] = "interleaved_1f1b" if layout.virtual_stages > 1 else "1f1b"
        settings[VIRTUAL_STAGES_KEY] = layout.virtual_stages
    return settings


def excluded_dimensions(recipe: str, cfg: Any, config: dict[str, Any], arch: Architecture,
                        registries: Any) -> dict[str, str]:
    """Dimensions this model or recipe cannot use, with the reason."""
    excluded: dict[str, str] = {}
    plan_types = registries.parallel_plans.names() if registries is not None else None
    model_type = config.get("model_type", "?")
    if plan_types is not None and model_type not in plan_types:
        excluded["tp"] = f"no tensor-parallel plan for model type {model_type}"
    problems = [message for key, message in context_parallel_problems(recipe, cfg, cp=2) if key == "distributed.cp"]
    if problems:
        excluded["cp"] = problems[0].split(" Set distributed.cp=1")[0]
    elif arch.experts > 1:
        excluded["cp"] = "a mixture of experts' balance loss needs whole sequences"
    vision = config.get("vision_config") is not None or cfg.get("data.name") == "vlm"
    pipeline = ("distillation" if recipe == "distill" else "a vision-language model" if vision
                else "a mixture of experts' balance loss" if arch.experts > 1 else None)
    if pipeline:
        excluded["pp"] = f"pipeline parallelism does not run {pipeline}"
    return excluded


def hardware_for(cfg: Any, target: Target) -> Hardware:
    """The layout model's hardware: the CPU entry, this machine's GPU by name (the table's entry,
    else the H100's links with the name's peak), or for a cluster job the H100's."""
    if target.device == "cpu":
        hardware = HARDWARE["cpu"]
    else:
        name = target.gpu or ""
        known = [entry for key, entry in HARDWARE.items() if key != "cpu" and re.search(rf"\b{key}\b", name, re.I)]
        hardware = known[0] if known else HARDWARE["h100"]
        tflops, _ = lookup_peak(name) if name and not known else (None, None)
        if tflops:
            hardware = replace(hardware, name=name, peak_flops=tflops * 1e12)
    peak = cfg.get("train.peak_tflops")
    return replace(hardware, peak_flops=peak * 1e12) if peak else hardware
