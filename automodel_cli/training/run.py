"""``TrainingRun``: one training run, from the processes to the Hugging Face outputs.

A recipe builds what is its own -- tokenizer, data, model(s) -- and a step function; the run
owns everything else, the same for every recipe and on one process or many::

    def run(context):
        with TrainingRun(context) as run:            # processes, mesh, run dir (locked), loss, precision
            cfg = run.cfg
            tokenizer = load_tokenizer(cfg.model)
            data = ...                                # the recipe's data
            model = run.prepare_model(load_model(cfg.model, seed=cfg.train.seed, dtype=run.precision.param_dtype))
            run.build_optimizer(total_steps)          # optim.name + optim.scheduler
            run.resume()                              # checkpoint.resume; opens config.yaml, metrics.jsonl, loggers
            result = run.train(step, total_steps=total_steps, evaluate=..., describe=...)
            if result.stopped:
                return result.exit_code               # a signal stopped it after a checkpoint
            return run.finish(tokenizer, summary={...})

``step(step_index) -> StepOutput`` runs the forward and backward passes of one optimizer step on
this rank's share of the step's micro-batches and returns the per-rank sums of its losses; the
run all-reduces them over the data-parallel ranks, clips, steps the optimizer and schedule,
logs every step, validates and checkpoints when due, and stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO


@dataclass
class StepOutput:
    """What a step function returns for one optimizer step.

    ``sums``: this rank's sums of the step's losses (0-d tensors; ``"loss"`` first, then any
    terms such as ``"ce_loss"``, ``"kl"``), each normalised by the step's trained tokens over all
    ranks, so their all-reduce over data-parallel ranks is the step's value. ``tokens``: tokens
    in the step over all ranks (for tokens/s). ``metrics``: anything else to log for the step
    (plain numbers: ``label_tokens``, ``epoch``, ...).
    """

    sums: dict[str, Any]
    tokens: int
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    """How ``TrainingRun.train`` ended: the last step, the last validation result, the first and
    last step's metrics and, when a signal stopped it early (after saving a checkpoint), the exit
    code to return."""

    step: int
    after: dict[str, Any] | None
    exit_code: int | None = None
    first: dict[str, Any] | None = None  # the metrics of the first step this process ran
    last: dict[str, Any] | None = None  # ... and of the last one

    @property
    def stopped(self) -> bool:
        return self.exit_code is not None


class TrainingRun:
    """Everything a training recipe shares; see the module docstring for the shape of a recipe.

    Attributes a recipe uses: ``cfg`` (the resolved config), ``registries``, ``env`` (rank,
    world size, device), ``shape`` and ``mesh`` (the device mesh, None on one process),
    ``dp_size``/``dp_index`` (data-parallel size and this rank's index), ``cp_size``/``cp_rank``/
    ``cp_group`` (context parallelism; ``training/context_parallel.py``), ``pad_multiple`` (what
    batches are padded to a multiple of, or None), ``precision``
    (device, dtypes, ``autocast()``), ``loss_spec`` (``loss.name``'s ``LossSpec``, ready for
    ``training_loss``),
    ``sequence_parallel``, ``output_dir`` (a ``Path``; None with ``output=False``), ``say``
    (print on rank 0), and after the calls below ``model``, ``optimizer``, ``scheduler``,
    ``start_step``.

    ``output=False`` (benchmarks) claims no run directory and writes nothing; ``stream`` is where
    ``say`` prints (default stdout).
    """

    def __init__(self, context: Any, *, output: bool = True, stream: TextIO | None = None):
        from automodel_cli.components.distributed import mesh as meshes
        from automodel_cli.components.peft.lora import check_qlora
        from automodel_cli.components.training import float8
        from automodel_cli.training import context_parallel, loop, memory_plan, pipeline

        self.context = context
        self.cfg = context.config
        self.registries = context.registries
        # Processes and mesh sizes first: checked before anything is read or written.
        self.env, self.shape, self.say = loop.processes(self.cfg, stream)
        context_parallel.check_recipe(context.recipe, self.shape.cp)
        pipeline.check(context.recipe, self.cfg)
        float8.check(self.cfg, self.env.device)  # train.precision=fp8: a float8 GPU and torchao
        check_qlora(self.cfg, self.shape)  # peft.method=qlora: FSDP2 only, torchao for nf4
        self.output_dir: Path | None = loop.claim_output_dir(self.cfg, context.recipe, self.env) if output else None
        self.mesh, self.dp_size, self.dp_index = loop.data_parallel(self.shape, self.env)
        # Context parallelism: cp peers share dp_index and split each sequence's tokens.
        self.cp_size, self.cp_rank, self.cp_group = (meshes.cp_size(self.mesh), meshes.cp_rank(self.mesh),
                                                     meshes.cp_group(self.mesh))
        # Pipeline parallelism: pp peers share dp_index and run the stages of the same samples.
        self.pp_size = meshes.pp_size(self.mesh)
        self.pipeline_plan = (pipeline.PipelinePlan(self.cfg, self.pp_size, meshes.pp_rank(self.mesh))
                              if self.pp_size > 1 else None)
        self.pipeline: Any = None  # training.pipeline.Pipeline, once the model is loaded
        # A kernel loss that cannot run here (package or GPU missing) stops the run now.
        self.loss_spec = loop.build_loss(self.cfg, self.registries, self.env.device)
        # The same seed on every rank: identical initial weights.
        self.precision = loop.seeded_precision(self.cfg, self.env, self.dp_size)
        self.sequence_parallel = bool(self.cfg.distributed.sequence_parallel and self.shape.tp > 1)
        #: every batch's sequence length is padded to a multiple of this (sequence/context parallelism)
        self.pad_multiple = context_parallel.pad_multiple(self.shape.cp, self.shape.tp, self.sequence_parallel)
        memory_plan.say_plan(self)  # the memory plan: the first lines of a run
        self.model: Any = None
        self.base_path: Any = None  # where an adapter's base weights live (load_model)
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.loggers: list[Any] = []
        self.start_step = 0
        self.flops: Any = None  # FLOPs per token (count_flops): adds TFLOP/s and MFU to every step
        self.peak: float | None = None
        self.peak_source: str | None = None
        self.balance: Any = None  # a mixture-of-experts model's BalanceMonitor (watch_routers)

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close_loggers()
        if self.pipeline is not None:
            from automodel_cli.components.checkpoint import stages

            stages.set_part(None)

    # ------------------------------------------------------------------------------ model
    def init_device(self) -> Any:
        """A context to build a model in: on the meta device for a sharded random init, else
        a no-op (``model_setup.init_device``)."""
        from automodel_cli.training.model_setup import init_device

        return init_device(self.cfg, self.precision.device)

    def load_model(self, tokenizer: Any = None, *, flops_seq_len: int | None = None,
                   config_overrides: dict[str, Any] | None = None) -> Any:
        """``model.*`` as this run trains it, never whole in any process: built on the meta
        device, with activation checkpointing, adapters, tensor parallelism and FSDP2 applied
        while empty, then each process's shards read from the safetensors (or seeded per
        parameter for ``model.from_scratch``). ``flops_seq_len``: count FLOPs per token at this
        sequence length (``count_flops``) on the bare model. ``tokenizer`` is saved with the
        random base weights an adapter trained from scratch needs (``base_path``).
        ``config_overrides``: values set on the model's config on top of ``model.config`` (a task
        head's: ``components/models/heads.py``), not recorded in the run's config."""
        from automodel_cli.components.models.heads import ModelSection
        from automodel_cli.components.models.loading import resolve_model_source
        from automodel_cli.run_layout import RunDir
        from automodel_cli.training.model_setup import build_model, save_random_base

        cfg = self.cfg
        model_cfg = ModelSection(cfg.model, config_overrides) if config_overrides else cfg.model
        if cfg.model.from_scratch and cfg.peft.method != "none" and self.output_dir is not None:
            self.base_path = str(RunDir(self.output_dir).base_model.resolve())
            if self.env.is_main:
                from automodel_cli.components.training import run_lock

                run_lock.mark_writing(self.output_dir)
                save_random_base(cfg, tokenizer, self.base_path, self.precision.param_dtype, model_cfg=model_cfg)
        else:
            self.base_path = resolve_model_source(cfg.model.path)
        on_empty = (lambda model: self.count_flops(model, flops_seq_len)) if flops_seq_len else None
        self.model = build_model(cfg, model_cfg, precision=self.precision, mesh=self.mesh, shape=self.shape,
                                 registries=self.registries, sequence_parallel=self.sequence_parallel,
                                 dtype=self.precision.param_dtype, trainable=True, say=self.say, on_empty=on_empty,
                                 pipeline=self.pipeline_plan)
        self.watch_routers()
        if self.pipeline_plan is not None:
            self.start_pipeline()
        return self.model

    def evaluation_model(self, model: Any) -> Any:
        """What validation calls: ``model``, or with pipeline parallelism a module that runs the
        stages forward only and gives every rank the logits."""
        return model if self.pipeline is None else self.pipeline.evaluation_model(model)

    def start_pipeline(self) -> None:
        """The stages of this rank over the loaded model and their schedule (``distributed.pp``)."""
        from automodel_cli.components.checkpoint import stages
        from automodel_cli.components.distributed import mesh as meshes
        from automodel_cli.errors import UserError
        from automodel_cli.training.pipeline import Pipeline

        if self.balance is not None:
            raise UserError(
                f"distributed.pp={self.pp_size} cannot train a mixture-of-experts model: its router balance "
                "loss needs every layer's routers on one rank.",
                "Set distributed.pp=1 for this model (expert parallelism, distributed.ep, splits its experts).")
        self.say(self.pipeline_plan.describe())
        group = meshes.pp_group_mesh(self.mesh).get_group()
        self.pipeline = Pipeline(self.pipeline_plan, self.model, group, self.precision.device, self.loss_spec,
                                 self.precision.autocast)
        # Checkpoints save and read this stage's part under the whole model's names.
        stages.set_part(stages.PipelinePart(group, self.pipeline_plan.tied))

    def prepare_model(self, model: Any) -> Any:
        """Activation checkpointing, adapters (``peft.method``), device, ``torch.compile`` and,
        on several processes, tensor parallelism and FSDP2; the model is trained from here on."""
        from automodel_cli.training.model_setup import prepare_model

        self.model = prepare_model(model, self.cfg, precision=self.precision, mesh=self.mesh, shape=self.shape,
                                   registries=self.registries, sequence_parallel=self.sequence_parallel,
                                   say=self.say)
        self.watch_routers()
        return self.model

    def watch_routers(self) -> None:
        """A mixture-of-experts model gets a balance monitor (``moe.*``): ``training_loss`` adds
        the router's balance loss and every step logs it with the expert load. A model without
        routers gets none (and says once that ``moe.*`` settings are ignored)."""
        from automodel_cli.components.moe.balance import attach_monitor

        moe = self.cfg.moe
        self.balance = attach_monitor(self.model, moe.aux_loss_coef, moe.z_loss_coef)
        if self.balance is not None:
            self.say(self.balance.describe())
        elif moe.aux_loss_coef is not None or moe.z_loss_coef is not None:
            self.say("warning: the model has no router: moe.aux_loss_coef and moe.z_loss_coef are ignored")

    def describe_model(self, model: Any, label: str = "model", extra: str = "") -> None:
        """One line: the model's path, parameter counts, precision and mesh."""
        from automodel_cli.components.peft.lora import count_parameters

        trainable, total = count_parameters(model)
        held = " in rank 0's pipeline stage(s)" if self.pipeline is not None else ""
        self.say(f"{label}: {self.cfg.model.path} ({extra}{total / 1e6:.2f}M parameters{held}, {trainable / 1e6:.2f}M "
                 f"trainable, {self.precision.describe()}, {self.shape.describe()})")

    def count_flops(self, model: Any, seq_len: int) -> None:
        """FLOPs per token of ``model`` at ``seq_len`` (before it is sharded) and the device's peak:
        every step then logs ``tflops_per_device`` and ``mfu``."""
        from automodel_cli.components.training import flops as flops_math

        self.flops = flops_math.flops_per_token(model, model.config, seq_len)
        self.peak, self.peak_source = flops_math.peak_tflops(self.env.device, self.cfg.train.peak_tflops)

    # -------------------------------------------------------------------------- optimizer
    def build_optimizer(self, total_steps: int | None) -> Any:
        """The optimizer ``optim.name`` names over the trainable parameters (``optim.*``) and, for
        ``total_steps`` steps, the schedule ``optim.scheduler`` names (None: no schedule). Call
        after ``prepare_model``."""
        from automodel_cli.components.optim.build import build_optimizer, build_scheduler, peak_lr

        self.optimizer = build_optimizer(self.model, self.cfg.optim, peak_lr(self.cfg.optim, self.cfg.peft.method),
                                         registries=self.registries)
        self.scheduler = (build_scheduler(self.optimizer, self.cfg.optim, total_steps, registries=self.registries)
                          if total_steps else None)
        return self.optimizer

    def optimizer_step(self) -> tuple[Any, float]:
        """Clip, step the optimizer and the schedule, zero the gradients: (grad norm, lr used)."""
        from automodel_cli.training.loop import optimizer_step

        return optimizer_step(self.model, self.optimizer, self.scheduler, self.cfg.train.max_grad_norm,
                              self.pipeline)

    def accumulation(self) -> int:
        """Micro-batches per data-parallel rank per step (``train.global_batch_size`` is the unit)."""
        from automodel_cli.components.training import steps as step_math

        return step_math.accumulation(self.cfg.train.global_batch_size, self.cfg.train.micro_batch_size,
                                      self.dp_size)

    def validate_before(self, evaluate: Callable[[], dict[str, Any] | None],
                        describe: Callable[[dict[str, Any]], str]) -> dict[str, Any] | None:
        """The validation before the first step of a fresh run, said as ``before training: ...``:
        the baseline every later validation is read against. None when resuming (the run already
        logged it) or without validation data."""
        before = evaluate() if self.start_step == 0 else None
        if before:
            self.say(f"before training: {describe(before)}")
        return before

    def announce(self, total_steps: int, unit: str, detail: str = "") -> None:
        """One line saying what the loop is about to do: the steps left, the step's size in
        ``unit`` (samples, packs, pairs, blocks of N tokens) and how it is split over the
        micro-batches and data-parallel ranks, and where the run goes."""
        self.say(f"training {total_steps - self.start_step} steps of {self.cfg.train.global_batch_size} {unit} "
                 f"({self.accumulation()} micro-batches of {self.cfg.train.micro_batch_size} on each of "
                 f"{self.dp_size} data-parallel rank(s){detail}) -> {self.output_dir}")

    # ---------------------------------------------------------------------- resume, files
    def resume(self, generators: dict[str, Any] | None = None) -> dict[str, Any]:
        """Restore ``checkpoint.resume`` (model, optimizer, schedule, RNG), then write the run's
        config and open its loggers (metrics.jsonl cut back to the resumed step). Returns the
        checkpoint's train state (``{"step": 0}`` for a fresh start)."""
        from automodel_cli.training import loop

        assert self.output_dir is not None, "TrainingRun(output=False) has no run directory"
        state = loop.resume(self.cfg, self.output_dir, model=self.model, optimizer=self.optimizer,
                            scheduler=self.scheduler, say=self.say, is_main=self.env.is_main,
                            registries=self.registries)
        self.start_step = int(state["step"])
        self.loggers = loop.open_loggers(self.cfg, self.registries, self.output_dir, self.start_step,
                                         self.env.is_main)
        return state

    def close_loggers(self) -> None:
        for logger in self.loggers:
            logger.close()
        self.loggers = []

    # ------------------------------------------------------------------------------- loop
    def train(self, step_fn: Callable[[int], StepOutput], *, total_steps: int,
              evaluate: Callable[[], dict[str, Any] | None] | None = None,
              describe: Callable[[dict[str, Any]], str] = str,
              checkpoint_state: Callable[[int], dict[str, Any]] | None = None,
              tokenizer: Any = None, after_first_step: Callable[[], str | None] | None = None) -> TrainResult:
        """Run steps ``start_step .. total_steps - 1``: one optimizer step per iteration.

        ``evaluate`` validates (every ``train.eval_every_steps`` steps and after the last one;
        ``describe`` formats its result). ``checkpoint_state(step)`` adds the recipe's own state
        to each checkpoint's train state (e.g. a data position). ``tokenizer`` is stored with
        checkpoints so ``checkpoint consolidate`` has it. ``after_first_step`` may return one
        line to say after the first step (how the step ran).
        """
        import torch

        from automodel_cli.components.checkpoint import GracefulStop
        from automodel_cli.components.distributed import mesh as meshes
        from automodel_cli.components.training import flops as flops_math
        from automodel_cli.components.training.progress import TrainingProgress
        from automodel_cli.training import loop

        cfg, env = self.cfg, self.env
        step, after, stopping, first, metrics = self.start_step, None, False, None, None
        checkpoints = loop.Checkpoints(cfg, self.output_dir, model=self.model, optimizer=self.optimizer,
                                       scheduler=self.scheduler, tokenizer=tokenizer)
        if self.balance is not None:  # the router terms' normaliser: micro-batches per step, all ranks
            self.balance.micro_batches = self.accumulation() * self.dp_size
        with GracefulStop() as stop, TrainingProgress(total_steps, step, cfg.logging.progress and env.is_main) as progress:
            while step < total_steps and not stopping:
                started = time.perf_counter()
                out = step_fn(step)
                routed = self.balance.take_step() if self.balance is not None else None
                grad_norm, lr = self.optimizer_step()
                step += 1
                elapsed = time.perf_counter() - started
                sums = {**out.sums, **(routed.sums if routed is not None else {})}
                names = list(sums)
                values = meshes.all_reduce_loss(torch.stack([sums[n].detach().float() for n in names]),
                                              self.mesh).tolist()
                metrics = {"step": step, **dict(zip(names, values))}
                histograms = self._router_metrics(routed, metrics) if routed is not None else None
                metrics.update({"lr": lr, "grad_norm": grad_norm, "tokens": out.tokens, **out.metrics,
                                **loop.step_rates(out.tokens, elapsed, env.world_size)})
                if self.flops is not None:
                    tflops, mfu = flops_math.achieved(self.flops.total * out.tokens, elapsed, env.world_size, self.peak)
                    metrics.update(tflops_per_device=tflops, mfu=mfu)
                if step == self.start_step + 1:
                    first = metrics
                    if after_first_step is not None and (note := after_first_step()):
                        self.say(note)
                    if routed is not None:
                        self.say(describe_router_step(metrics))
                after = loop.log_step(cfg, step, total_steps, metrics, evaluate=evaluate or (lambda: None),
                                      describe=describe, loggers=self.loggers, progress=progress,
                                      histograms=histograms) or after
                save_now, stopping = loop.checkpoint_due(cfg, step, total_steps, stop, env)
                checkpoints.at_step(step, save_now=save_now, stopping=stopping, train_state=lambda: {
                    "step": step, **(checkpoint_state(step) if checkpoint_state else {})})
            checkpoints.close()  # the last checkpoint is published before final/ is written
        code = loop.close_loop(self.loggers, stop, step, total_steps, self.output_dir, self.say)
        self.loggers = []
        if code is None and after:
            self.say(f"after training:  {describe(after)}")
        return TrainResult(step, after, code, first, metrics)

    def _router_metrics(self, routed: Any, metrics: dict[str, Any]) -> dict[str, list[float]] | None:
        """Into the step's ``metrics`` (already holding the all-reduced ``loss``, ``aux_loss`` and
        ``z_loss``): ``ce_loss``, the loss without the router terms (unless the recipe logs its
        own), and with ``moe.log_expert_load`` the expert load summed over data-parallel ranks;
        returns its per-layer histograms for the loggers that draw them."""
        from automodel_cli.components.distributed import mesh as meshes
        from automodel_cli.components.moe.balance import load_histograms, load_metrics

        if "ce_loss" not in metrics:
            router_terms = self.balance.aux_coef * metrics["aux_loss"] + self.balance.z_coef * metrics.get("z_loss", 0.0)
            metrics["ce_loss"] = metrics["loss"] - router_terms
        if not self.cfg.moe.log_expert_load:
            return None
        load = meshes.all_reduce_dp(routed.load.float().contiguous(), self.mesh).cpu()
        metrics.update(load_metrics(load))
        return load_histograms(load)

    # ----------------------------------------------------------------------------- finish
    def finish(self, tokenizer: Any, *, summary: dict[str, Any], base_path: Any = None) -> int:
        """Gather the model from every rank, write ``final/`` (a Hugging Face directory, or the
        adapter with LoRA/DoRA) and ``summary.json`` on rank 0, and end the process group.
        ``base_path``: where the adapter's base weights live (default ``model.path``)."""
        from automodel_cli.components.models.loading import resolve_model_source
        from automodel_cli.training.loop import save_outputs

        base = base_path if base_path is not None else self.base_path or resolve_model_source(self.cfg.model.path)
        save_outputs(self.model, tokenizer, self.cfg, self.env, self.output_dir, self.say, base_path=base,
                     summary=summary, pipeline=self.pipeline)
        return 0

    def end(self) -> None:
        """End the process group (a run that writes no outputs, e.g. a benchmark)."""
        from automodel_cli.components.distributed import env as dist_env

        dist_env.destroy()


def describe_router_step(metrics: dict[str, Any]) -> str:
    """One line about a step's router: its balance loss and, when logged, the expert load."""
    parts = [f"router after step {metrics['step']}: aux loss {metrics['aux_loss']:.4f}"]
    if "z_loss" in metrics:
        parts.append(f"z-loss {metrics['z_loss']:.4f}")
    if "expert_load_max_mean" in metrics:
        layers = sorted(k for k in metrics if k.startswith("expert_load_max_mean_layer"))
        per_layer = ", ".join(f"{metrics[k]:.2f}" for k in layers)
        parts.append(f"expert load max/mean {metrics['expert_load_max_mean']:.2f} (per layer: {per_layer})")
    return "; ".join(parts)
