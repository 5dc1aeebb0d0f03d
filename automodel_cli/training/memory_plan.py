"""The memory plan of a configured run, printed by ``--dry-run``, ``automodel plan`` and as the
first lines of a run.

``components/training/memory_plan.py`` computes the plan from plain values; this module reads
them from a resolved config: the model's config.json (offline: a local directory, a preset's
bundled copy or the Hugging Face cache; ``model.config`` overrides applied), the mesh, the
precision policy, ``peft.*``, the micro-batch and sequence length of the recipe, the loss and
activation checkpointing. It also finds what the plan is compared with (``Target``): the GPU or
the host memory of this machine when the processes run here, ``launch.device_memory_gib`` when
given, and nothing for a cluster job without it. No torch until a run is under way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from typing import Any

from automodel_cli.components.launch.preflight import offline_config
from automodel_cli.components.training import memory_plan as plans
from automodel_cli.components.training.layout import Layout, in_flight, pipeline_plan, pipeline_stage
from automodel_cli.components.training.memory_plan import GIB, Architecture, Knob, MemoryPlan, Setup, gib

#: Processes that read SFT data pad their batches (``attention_mask``) unless data is packed.
PADDED_RECIPES = ("finetune", "distill", "dpo", "classify")


@dataclass(frozen=True)
class Target:
    """Where the processes run: ``device`` (cuda or cpu), whether it computes in bf16, and the
    bytes one process may use (None: unknown, so the plan gives no verdict); ``gpu``: the GPU's
    name when this machine has one (the automatic layout looks up its speed)."""

    device: str
    capacity: int | None
    description: str
    bf16_supported: bool = True
    gpu: str | None = None


@dataclass
class PlanReport:
    """A plan with its verdict and advice, or the reason there is none."""

    target: Target
    setup: Setup | None = None
    result: MemoryPlan | None = None
    knobs: list[Knob] = field(default_factory=list)
    advice: Knob | None = None
    reason: str | None = None
    headline: str = ""

    @property
    def fits(self) -> bool | None:
        if self.result is None or self.target.capacity is None:
            return None
        return self.result.peak <= self.target.capacity

    def lines(self) -> list[str]:
        if self.result is None or self.setup is None:
            return [f"memory plan: none ({self.reason})"]
        lines = [f"memory plan per process ({self.headline}):"]
        lines += ["  " + line for line in plans.table(self.result, self.setup)]
        capacity = self.target.capacity
        if capacity is None:
            lines.append(f"  {'device':<16} {'?':>12}  {self.target.description}")
        else:
            spare = capacity - self.result.peak
            verdict = f"fits, {gib(spare)} to spare" if spare >= 0 else "does NOT fit"
            lines.append(f"  {'device':<16} {gib(capacity):>12}  {self.target.description}: {verdict}")
        if self.fits is False:
            lines.append(f"  will not fit: the peak is {gib(self.result.peak)}, {gib(self.result.peak - capacity)} "
                         f"more than the {gib(capacity)} a process has.")
            if self.advice is not None:
                outcome = "fits" if self.advice.fits else "still does not fit"
                others = [knob.setting.split(" (")[0] for knob in self.knobs
                          if knob.setting != self.advice.setting and knob.saving > 0]
                lines.append(f"  helps most: {self.advice.setting} (peak {gib(self.advice.peak)}, {outcome})"
                             + (f"; also: {', '.join(others)}" if others else ""))
        lines += [f"  note: {note}" for note in self.result.notes]
        return lines

    def as_dict(self) -> dict[str, Any]:
        if self.result is None or self.setup is None:
            return {"plan": None, "reason": self.reason, "device": self.target.description}
        terms = {name: getattr(self.result, name) for name in
                 ("parameters", "gradients", "optimizer", "activations", "activations_none", "activations_full",
                  "logits", "transient", "optimizer_scratch", "allocator_slack", "teacher", "peak")}
        return {
            "headline": self.headline,
            "bytes": terms,
            "gib": {name: round(value / GIB, 3) for name, value in terms.items()},
            "phase": self.result.phase, "phases": self.result.phases,
            "trainable_parameters": self.result.trainable, "total_parameters": self.result.total_parameters,
            "param_dtype": self.result.param_dtype, "autocast_dtype": self.result.autocast_dtype,
            "setup": {key: value for key, value in vars(self.setup).items() if key != "teacher"},
            "device": {"kind": self.target.device, "capacity_bytes": self.target.capacity,
                       "description": self.target.description},
            "fits": self.fits,
            "advice": _knob_dict(self.advice) if self.advice else None,
            "knobs": [_knob_dict(knob) for knob in self.knobs],
            "notes": self.result.notes,
        }


def _knob_dict(knob: Knob) -> dict[str, Any]:
    return {"setting": knob.setting, "peak_bytes": knob.peak, "saving_bytes": knob.saving, "fits": knob.fits}


# ----------------------------------------------------------------------------- the plan
def plan_report(cfg: Any, recipe: str, shape: Any, target: Target, registries: Any = None) -> PlanReport:
    """The plan of the run ``cfg`` describes for ``recipe`` on the mesh ``shape``, judged against
    ``target``."""
    report = PlanReport(target)
    config = offline_config(cfg)
    if config is None and not cfg.get("model.path"):
        report.reason = "model.path is not set; give a TARGET or model.path=..."
        return report
    if config is None:
        report.reason = (f"no config.json of {cfg.get('model.path')!r} on this machine (a local directory, a "
                         "preset or the Hugging Face cache); it is read when the run starts")
        return report
    architecture = Architecture.from_config(config)
    if architecture is None:
        report.reason = f"the config of {cfg.get('model.path')!r} lacks the sizes of a decoder (hidden_size, ...)"
        return report
    report.setup = setup = setup_from_config(cfg, recipe, shape, target, registries)
    pp, stages = getattr(shape, "pp", 1), configured_virtual_stages(cfg)
    report.result = pipeline_plan(architecture, setup, pp=pp, virtual_stages=stages)
    stage = pipeline_stage(architecture, pp)  # the knobs are tried on the last stage
    report.knobs = plans.knobs(stage, setup, target.capacity)
    if target.capacity is not None:
        report.advice = plans.advise(stage, setup, target.capacity)
    if pp > 1:
        flight = in_flight(Layout(pp=pp, accumulation=setup.accumulation, virtual_stages=stages))
        report.result.notes.append(f"pipeline: the larger of the first and last of {pp} stages ({stage.layers} of "
                                   f"{architecture.layers} layers each; the first keeps the activations of "
                                   f"{flight:g} micro-batch{'es' * (flight != 1)} in flight, the last the LM head "
                                   "and the loss)")
    method = {"none": "full fine-tuning", "lora": f"LoRA r={setup.lora_rank}", "dora": f"DoRA r={setup.lora_rank}",
              "qlora": f"QLoRA r={setup.lora_rank} ({cfg.get('peft.quantization') or 'nf4'} base)"}
    report.headline = (f"{recipe}, {shape.describe()}, {method[setup.peft]}, AdamW, micro-batch {setup.micro_batch} x "
                       f"{setup.seq_len} tokens, activation checkpointing {plans.checkpointing_mode(setup.activation_checkpointing)}, "
                       f"{target.device}")
    if "vision_config" in (config.to_dict() if hasattr(config, "to_dict") else dict(config)):
        report.result.notes.append("vision-language model: the plan counts the language model only (the vision "
                                   "tower, usually small beside it, and its image activations are not planned)")
    if setup.teacher is None and recipe == "distill":
        report.result.notes.append("distill: the teacher's config is not on this machine; its memory is not included")
    return report


def configured_virtual_stages(cfg: Any) -> int:
    """Model chunks per pipeline rank: ``distributed.pp_virtual_stages`` under interleaved 1F1B
    (default 2), else 1."""
    if cfg.get("distributed.pp_schedule") != "interleaved_1f1b":
        return 1
    return int(cfg.get("distributed.pp_virtual_stages") or 2)


def setup_from_config(cfg: Any, recipe: str, shape: Any, target: Target, registries: Any = None) -> Setup:
    """The plan's inputs from a resolved config (see the module docstring)."""
    if recipe == "benchmark":
        micro, seq, key, accumulation = (cfg.get("benchmark.batch_size"), cfg.get("benchmark.seq_len"),
                                         "benchmark.batch_size", 1)
    else:
        micro, seq, key = cfg.get("train.micro_batch_size"), cfg.get("data.max_length"), "train.micro_batch_size"
        global_batch = cfg.get("train.global_batch_size") or micro
        accumulation = max(1, global_batch // max(1, micro * shape.dp_size))
    loss_name = cfg.get("loss.name") or "masked_ce"
    kind, rows, fallback = loss_kind(registries, loss_name)
    teacher, teacher_dtype, frozen_role = None, cfg.get("distill.teacher_dtype") or "auto", "distill: the teacher"
    if recipe == "distill":
        teacher_config = offline_config(cfg, "distill.teacher_path", None)
        teacher = Architecture.from_config(teacher_config) if teacher_config is not None else None
    if recipe == "dpo":  # k pairs are 2k sequences; a frozen reference copy unless LoRA, reference-free or precomputed
        from automodel_cli.components.loss.preference import REFERENCE_FREE

        micro = 2 * int(micro)
        teacher_dtype, frozen_role = cfg.get("model.dtype") or "auto", "dpo: the reference model"
        reference_key = "dpo.reference_path" if cfg.get("dpo.reference_path") else "model.path"
        copy = (cfg.get("dpo.loss") not in REFERENCE_FREE and not cfg.get("dpo.precompute_reference")
                and (reference_key == "dpo.reference_path" or (cfg.get("peft.method") or "none") == "none"))
        reference_config = offline_config(cfg, reference_key, None) if copy else None
        teacher = Architecture.from_config(reference_config) if reference_config is not None else None
    score_labels = 0
    if recipe == "classify":  # a score head: one output per label (the demo's or classify.labels), 1 for rewards
        labels = cfg.get("classify.labels")
        reward = cfg.get("classify.task") == "reward"
        score_labels = 1 if reward else max(2, len(labels) if labels else 2)
        micro = 2 * int(micro) if reward else micro  # a reward model scores both answers of each pair
    targets = cfg.get("peft.target_modules") or "all-linear"
    return Setup(
        micro_batch=int(micro), seq_len=int(seq), device=target.device, bf16_supported=target.bf16_supported,
        model_dtype=cfg.get("model.dtype") or "auto", peft=cfg.get("peft.method") or "none",
        quantization=cfg.get("peft.quantization") or "nf4",
        lora_rank=int(cfg.get("peft.rank") or 8),
        lora_targets=targets if isinstance(targets, str) else tuple(targets),
        dp_replicate=shape.dp_replicate, dp_shard=shape.dp_shard, tp=shape.tp, cp=getattr(shape, "cp", 1),
        ep=int(cfg.get("distributed.ep") or 1),
        sequence_parallel=bool(cfg.get("distributed.sequence_parallel")) and shape.tp > 1,
        activation_checkpointing=str(plans.checkpointing_mode(cfg.get("train.activation_checkpointing"))),
        loss_name=loss_name, loss_kind=kind, loss_rows=rows, fused_fallback=fallback,
        chunk_size=cfg.get(f"loss.{loss_name}.chunk_size"), accumulation=accumulation,
        attention_mask=recipe in PADDED_RECIPES and not cfg.get("data.packing"),
        teacher=teacher, teacher_dtype=teacher_dtype, frozen_role=frozen_role, micro_batch_key=key,
        score_labels=score_labels,
    )


def loss_kind(registries: Any, name: str) -> tuple[str, bool, str]:
    """(kind, whether the head runs on the trained rows only, the fused loss's fallback kind) of
    the registered loss ``name``, read from its ``LossSpec`` without loading any code; a loss
    registered as a function is counted like ``masked_ce`` on full logits."""
    from automodel_cli.components.loss.builtin import CHUNKED_CE
    from automodel_cli.components.loss.spec import LossSpec

    spec = None
    if registries is not None and name in registries.losses:
        spec = registries.losses.get(name).target
    elif registries is None:
        from automodel_cli.components.loss import builtin

        spec = getattr(builtin, name.upper(), None)
    if not isinstance(spec, LossSpec):
        return "masked", False, "masked"
    if spec.kind == "fused":  # a fused loss without a fallback falls back to masked_ce
        return "fused", True, "chunked" if spec.logits_fallback == CHUNKED_CE.fn else "masked"
    return ("chunked" if spec.fn == CHUNKED_CE.fn else "masked"), spec.rows, "masked"


# --------------------------------------------------------------------------- the targets
def launch_target(cfg: Any, *, local: bool, processes_per_node: int) -> Target:
    """What a launch's processes run on, without torch: this machine's first GPU (nvidia-smi)
    or its available memory for a local launch; for a cluster job GPUs when ``--gpus-per-node``
    requests some, with ``launch.device_memory_gib`` as the capacity (none if unset)."""
    given = cfg.get("launch.device_memory_gib")
    if not local:
        device = "cuda" if (cfg.get("launch.gpus_per_node") or 0) > 0 else "cpu"
        if given is None:
            return Target(device, None, "not known for a cluster job: set launch.device_memory_gib for a verdict")
        return _given(device, given, processes_per_node)
    gpu = local_gpu()
    if gpu is not None:
        name, memory, bf16 = gpu
        if given is not None:
            return replace(_given("cuda", given, processes_per_node, bf16), gpu=name)
        return Target("cuda", memory, f"this machine's GPU ({name})", bf16, gpu=name)
    if given is not None:
        return _given("cpu", given, processes_per_node)
    return host_target(processes_per_node)


def run_target(cfg: Any, device: Any) -> Target:
    """What this process runs on (a run under way: torch is loaded)."""
    import torch

    processes = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    given = cfg.get("launch.device_memory_gib")
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if given is not None:
            return _given("cuda", given, processes, bf16)
        properties = torch.cuda.get_device_properties(device)
        return Target("cuda", int(properties.total_memory), f"{properties.name}", bf16)
    if given is not None:
        return _given("cpu", given, processes)
    return host_target(processes)


def host_target(processes_per_node: int) -> Target:
    """The memory available on this machine now, shared by ``processes_per_node`` processes."""
    import psutil

    available = psutil.virtual_memory().available
    share = f", shared by {processes_per_node} processes" if processes_per_node > 1 else ""
    return Target("cpu", available // max(1, processes_per_node),
                  f"host memory available now ({gib(available)}{share})")


def _given(device: str, value: float, processes_per_node: int, bf16: bool = True) -> Target:
    if device == "cpu":  # one node's memory, shared by its processes
        return Target(device, int(value * GIB) // max(1, processes_per_node),
                      f"launch.device_memory_gib={value:g} per node, {processes_per_node} process(es)", bf16)
    return Target(device, int(value * GIB), f"launch.device_memory_gib={value:g}", bf16)


def local_gpu() -> tuple[str, int, bool] | None:
    """(name, bytes, bf16) of this machine's first NVIDIA GPU as nvidia-smi reports it, or None
    (no nvidia-smi, no GPU). bf16 needs compute capability 8.0 (Ampere) or newer."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        name, memory, capability = [part.strip() for part in out.splitlines()[0].split(",")]
        return name, int(float(memory) * 2**20), float(capability) >= 8.0
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


# ------------------------------------------------------------------------------- callers
def launch_plan_text(spec: Any, launcher: Any, registries: Any = None) -> str:
    """The plan of a launch (``LaunchSpec``) as comment lines, for ``--dry-run``: judged against
    this machine unless the launcher sends the job to a cluster (one that requests GPUs)."""
    target = launch_target(spec.config, local=not launcher.requests_gpus, processes_per_node=spec.nproc_per_node)
    report = plan_report(spec.config, spec.recipe, spec.mesh, target, registries)
    return "".join(f"# {line}\n" for line in report.lines())


def say_plan(run: Any) -> None:
    """Print the plan of ``run`` (a ``TrainingRun``) on rank 0: the first lines of a run."""
    if not run.env.is_main:
        return
    target = run_target(run.cfg, run.env.device)
    report = plan_report(run.cfg, run.context.recipe, run.shape, target, run.registries)
    for line in report.lines():
        run.say(line)
