"""Pieces every training recipe needs, the same on one process or many.

- ``processes``, ``claim_output_dir``, ``data_parallel``, ``build_loss``, ``seeded_precision``:
  the start of a run.
- ``printer``, ``barrier``, ``any_rank``: rank 0 speaks for the run; ranks agree on stopping.
- ``resume``: restore the checkpoint ``checkpoint.resume`` names (or none) and return its train
  state; ``open_loggers``: the run's config and metric files, cut back to the resumed step.
- ``optimizer_step``, ``log_step``, ``checkpoint_due``, ``Checkpoints``: the end of every step.
- ``close_loop``: how a run stopped by a signal ends; ``save_outputs``: how a finished run ends.
"""

from __future__ import annotations

import json
import math
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from automodel_cli.run_layout import RunDir


def processes(cfg: Any, stream: TextIO | None = None) -> tuple[Any, Any, Callable[[str], None]]:
    """(this process's ``DistEnv``, the mesh shape, rank 0's ``say``). Mesh sizes are checked
    here, before anything is read or written."""
    from automodel_cli.components.distributed import env as dist_env
    from automodel_cli.components.distributed.mesh import MeshShape

    env = dist_env.init_distributed()
    shape = MeshShape.resolve(cfg.distributed.dp_replicate, cfg.distributed.dp_shard,
                              cfg.distributed.tp, world_size=env.world_size, ep=cfg.distributed.ep,
                              cp=cfg.distributed.cp, pp=cfg.distributed.pp)
    return env, shape, printer(env.is_main, stream)


def claim_output_dir(cfg: Any, recipe: str, env: Any) -> Path:
    """The run's directory (``output_dir``, recorded in the config), created, writable and locked
    for this run (``run_lock``); one that holds another run, or is in use, is refused before
    anything loads. Global rank 0 vets and locks it for the whole job (another rank would see
    rank 0's lock as a second run); every rank learns the outcome and the directory."""
    from automodel_cli.components.checkpoint import collective
    from automodel_cli.components.training import run_lock
    from automodel_cli.training.run_dir import prepare_output_dir

    def vet_and_lock() -> str | None:
        if not env.is_main:
            return None
        output_dir = prepare_output_dir(cfg, recipe)
        lock = run_lock.acquire(output_dir, recipe)
        if (note := run_lock.stale_note(lock)) is not None:
            print(note, flush=True)
        return str(output_dir)

    output_dir = Path(collective.broadcast(collective.run_agreed(vet_and_lock)))
    cfg.tree["output_dir"] = str(output_dir)
    return output_dir


def data_parallel(shape: Any, env: Any) -> tuple[Any, int, int]:
    """(the device mesh or None on one process, data-parallel size, this rank's data-parallel
    index)."""
    from automodel_cli.components.distributed import mesh as meshes

    mesh = meshes.build_mesh(shape, env.device.type)
    return mesh, meshes.dp_world_size(mesh), meshes.dp_rank(mesh)


def seeded_precision(cfg: Any, env: Any, dp_size: int) -> Any:
    """Seed every rank alike (identical initial weights) and pick the precision policy."""
    import torch

    from automodel_cli.components.training.precision import Precision

    torch.manual_seed(cfg.train.seed)
    return Precision.choose(cfg.model.dtype, cfg.peft.method, env.device, sharded=dp_size > 1)


def build_loss(cfg: Any, registries: Any, device: Any) -> Any:
    """``loss.name``'s ``LossSpec`` from the registry with its options (``loss.NAME``) applied,
    ready for ``training_loss``; a loss whose ``check`` refuses this device (a kernel package or
    a GPU missing) stops the run now, before the model and data load."""
    from automodel_cli.components.loss.spec import LossSpec
    from automodel_cli.config.compose import entry_options
    from automodel_cli.errors import UserError

    name = cfg.loss.name
    entry = registries.losses.get(name)
    loss_spec = LossSpec.of(entry.load(), name)
    if loss_spec.options and not entry.option_table():
        raise UserError(f"loss `{name}` from {entry.provider} is registered by its path `{entry.target}`, so its "
                        f"options ({', '.join(sorted(loss_spec.options))}) are unknown to the config.",
                        "Have the plugin register the LossSpec object itself: registry.add(name, SPEC).")
    if loss_spec.check is not None:
        loss_spec.check(device)
    return loss_spec.configured(entry_options(cfg, registries.losses, name))


def printer(enabled: bool, stream: TextIO | None = None):
    """Print on rank 0 only, so a multi-process run reads like a single one. ``stream``
    defaults to stdout (looked up at call time, so captured output works)."""
    def say(message: str) -> None:
        if enabled:
            print(message, file=stream or sys.stdout, flush=True)

    return say


def barrier(env: Any) -> None:
    if env.distributed:
        import torch.distributed as dist

        dist.barrier()


def any_rank(flag: bool, env: Any) -> bool:
    """True on every rank once any rank has it: ranks must stop at the same step."""
    if not env.distributed:
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([int(flag)], device=env.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def resume(cfg: Any, output_dir: Path, *, model: Any, optimizer: Any, scheduler: Any,
           say: Any, is_main: bool = True, registries: Any = None) -> dict[str, Any]:
    """Restore the checkpoint that ``checkpoint.resume`` names; its train state, or
    ``{"step": 0}`` for a fresh start. With ``auto``, a damaged newest checkpoint is skipped for
    the newest intact one (said in one line); a checkpoint named by path must be intact.
    Settings changed since the checkpoint's run are refused or, with
    ``checkpoint.allow_changes``, applied; either way they are said and recorded."""
    from automodel_cli.components.checkpoint import find_checkpoint, load_checkpoint
    from automodel_cli.components.checkpoint.load import find_intact_checkpoint, resume_is_auto
    from automodel_cli.components.optim.build import apply_new_settings, build_optimizer, peak_lr
    from automodel_cli.training import run_dir
    from automodel_cli.training.run_dir import resume_requested

    if not resume_requested(cfg):
        return {"step": 0}
    auto = resume_is_auto(cfg.checkpoint.resume)
    checkpoint = (find_intact_checkpoint(output_dir, note=say) if auto
                  else find_checkpoint(cfg.checkpoint.resume, output_dir))
    if checkpoint is None:
        return {"step": 0}
    changes = run_dir.changes_since_checkpoint(cfg, checkpoint)
    run_dir.check_resume_changes(cfg, changes)  # an explicit path was not checked before loading
    # find_intact_checkpoint has verified every digest already; sizes are always checked.
    state = load_checkpoint(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler, verify=not auto)
    step = int(state["step"])
    say(f"resumed from {checkpoint} at step {step}")
    if changes:
        if changes.schedule:
            fresh = build_optimizer(model, cfg.optim, peak_lr(cfg.optim, cfg.peft.method), registries=registries)
            lr = apply_new_settings(optimizer, scheduler, fresh, step)
            say(f"applied changed settings from step {step + 1} on (checkpoint.allow_changes): "
                f"the schedule is recomputed for them; next learning rate {lr:.4g}")
        for line in changes.lines():
            say(f"  changed on resume: {line}")
        if is_main:
            run_dir.record_resume_changes(output_dir, step, changes)
    return state


def open_loggers(cfg: Any, registries: Any, output_dir: Path, start_step: int, is_main: bool) -> list[Any]:
    """On rank 0: write the resolved config, cut metrics.jsonl back to ``start_step`` and
    return the metric loggers (metrics.jsonl first). Other ranks log nothing."""
    from automodel_cli.components.logging import JsonlLogger, truncate_after
    from automodel_cli.components.training import run_lock
    from automodel_cli.training.loggers import build_loggers
    from automodel_cli.training.run_dir import save_config

    if not is_main:
        return []
    output_dir.mkdir(parents=True, exist_ok=True)
    # The loggers first: one that refuses its options (a UserError) or lacks its package stops
    # the run before it has written a config, so the directory does not hold a run afterwards.
    loggers = build_loggers(cfg, registries, output_dir)
    run_lock.mark_writing(output_dir)
    save_config(cfg, output_dir)
    metrics_path = RunDir(output_dir).metrics
    truncate_after(metrics_path, start_step)
    return [JsonlLogger(metrics_path), *loggers]


def optimizer_step(model: Any, optimizer: Any, scheduler: Any | None, max_grad_norm: float | None,
                   pipeline: Any = None) -> tuple[Any, float]:
    """Clip the gradients, step the optimizer and the schedule, zero the gradients; returns the
    gradient norm before clipping and the learning rate the step used. ``pipeline``
    (``training.pipeline.Pipeline``): the norm is the whole model's, over every stage."""
    from automodel_cli.components.distributed.parallelize import clip_grad_norm_
    from automodel_cli.components.moe.dispatch import sum_replica_grads

    sum_replica_grads(model)  # expert parallelism: replicas of the same experts add their tokens' gradients
    if pipeline is None:
        grad_norm = clip_grad_norm_(model.parameters(), max_grad_norm)
    else:
        grad_norm = clip_grad_norm_(model.parameters(), max_grad_norm, pipeline_group=pipeline.group,
                                    uncounted=pipeline.uncounted())
    lr = scheduler.get_last_lr()[0] if scheduler is not None else optimizer.param_groups[0]["lr"]
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def log_step(cfg: Any, step: int, total_steps: int, metrics: dict[str, Any], *, evaluate: Callable[[], Any],
             describe: Callable[[Any], str], loggers: list[Any], progress: Any,
             histograms: dict[str, list[float]] | None = None) -> dict[str, Any] | None:
    """Warn about a non-finite loss, validate when due (every ``train.eval_every_steps`` steps and
    after the last one), add the result to ``metrics`` and log them; returns the validation
    result, or None when none ran.

    ``loggers[0]`` (metrics.jsonl, from ``open_loggers``) gets every step; the other loggers and
    the progress display get every ``train.log_every_steps``-th step, the last step and every
    step that validated, with ``histograms`` (tag -> counts per bin) for those that draw them."""
    if not math.isfinite(metrics["loss"]):
        progress.log(f"warning: loss is {metrics['loss']} at step {step}")
    every = cfg.train.eval_every_steps
    result = None
    if step == total_steps or (every and step % every == 0):
        if (result := evaluate()) is not None:
            metrics.update(result)
            if step < total_steps:
                progress.log(f"step {step}: {describe(result)}")
    due = step == total_steps or step % cfg.train.log_every_steps == 0 or result is not None
    for logger in loggers if due else loggers[:1]:
        logger.log(metrics, step)
    if due and histograms:
        from automodel_cli.components.logging import log_histograms

        for logger in loggers[1:]:
            log_histograms(logger, histograms, step)
    if due:
        progress.update(step, metrics)
    return result


def step_rates(tokens: int, seconds: float, world_size: int) -> dict[str, float]:
    """``tokens_per_s`` (all processes) and ``tokens_per_s_per_device`` of a step."""
    return {"tokens_per_s": tokens / seconds, "tokens_per_s_per_device": tokens / seconds / world_size}


def checkpoint_due(cfg: Any, step: int, total_steps: int, stop: Any, env: Any) -> tuple[bool, bool]:
    """(save now, stop now), decided once per step and agreed by every rank.

    Save every ``checkpoint.every_steps`` steps, or when a signal stops the run early. The loop
    must stop on exactly this decision: asking "was a signal received?" a second time (say in
    the ``while`` condition) lets a signal that lands in between end the run unsaved."""
    every = cfg.checkpoint.every_steps
    stopping = step < total_steps and any_rank(stop.requested, env)
    return bool(every and step % every == 0) or stopping, stopping


class Checkpoints:
    """The loop's checkpoints, blocking or, with ``checkpoint.async``, written in the background
    one at a time: a checkpoint in flight is published at the first step boundary where every
    rank's writes are done, and at the latest before the next one starts and when the loop ends
    (``close``). A checkpoint for a stop signal is written blocking, so the run exits with it
    published. Every call is collective (each rank calls it at the same step)."""

    def __init__(self, cfg: Any, output_dir: Path, *, model: Any, optimizer: Any, scheduler: Any,
                 tokenizer: Any) -> None:
        self._output_dir, self._keep = output_dir, cfg.checkpoint.keep
        self._background = bool(getattr(cfg.checkpoint, "async"))  # ``async`` is a Python keyword
        self._objects = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "tokenizer": tokenizer}
        self._pending: Any = None

    def at_step(self, step: int, *, save_now: bool, stopping: bool,
                train_state: Callable[[], dict[str, Any]]) -> None:
        """After optimizer step ``step``: publish a finished (or, before a save, any) background
        checkpoint, then save one if ``save_now`` (``train_state()`` is its train state)."""
        from automodel_cli.components.checkpoint import start_checkpoint

        if self._pending is not None and (save_now or self._pending.ready()):
            self.close()
        if save_now:
            background = self._background and not stopping
            self._pending = start_checkpoint(self._output_dir, step, train_state=train_state(), keep=self._keep,
                                             background=background, **self._objects)
            if not background:
                self.close()

    def close(self) -> None:
        """Publish the checkpoint in flight, waiting for its writes (before ``final/`` is written)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.finish()


def close_loop(loggers: list[Any], stop: Any, step: int, total_steps: int, output_dir: Path, say: Any) -> int | None:
    """Close the loggers; when a signal stopped the run early (after saving a checkpoint), say
    how to continue and return its exit code (128 + signal), else None."""
    for logger in loggers:
        logger.close()
    if step >= total_steps:
        return None
    say(f"stopped at step {step}/{total_steps}; a checkpoint was saved. Continue with "
        f"checkpoint.resume=auto --output-dir {output_dir}")
    return 128 + int(getattr(signal, stop.signal_name or "SIGTERM"))


def save_outputs(model: Any, tokenizer: Any, cfg: Any, env: Any, output_dir: Path, say: Callable[[str], None], *,
                 base_path: Any, summary: dict[str, Any], pipeline: Any = None) -> None:
    """Write ``final/`` (every rank gathers the model one tensor at a time, rank 0 writes) and
    ``summary.json`` (rank 0), wait for every rank and close the process group."""
    from automodel_cli.components.distributed import env as dist_env
    from automodel_cli.components.models.saving import save_final

    # A failure on rank 0 (a full disk) is raised on every rank instead of leaving the others
    # waiting at the barrier.
    final_dir = save_final(model, tokenizer, output_dir, merge=cfg.peft.merge, base_path=base_path,
                           pipeline=(pipeline.group, pipeline.plan.tied) if pipeline is not None else None)
    if env.is_main:
        summary = {"steps": summary.pop("steps", None), "output_dir": str(output_dir), "final": str(final_dir),
                   **summary}
        RunDir(output_dir).summary.write_text(json.dumps(summary, indent=2))
        say(f"saved {final_dir}")
    barrier(env)
    dist_env.destroy()
