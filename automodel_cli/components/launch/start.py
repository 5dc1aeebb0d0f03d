"""From a resolved recipe config to a started job: pick the launcher, describe the job, go.

Used by every recipe command and by ``automodel launch FILE.yaml``. Inside a process that a
launcher started (torchrun sets LOCAL_RANK/WORLD_SIZE) the recipe simply runs.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from automodel_cli.components.distributed.mesh import MeshShape
from automodel_cli.components.launch.base import Launcher, LaunchSpec
from automodel_cli.components.launch.preflight import job_problems
from automodel_cli.components.launch.secrets import refuse_credentials
from automodel_cli.config.resolve import ConfigError
from automodel_cli.config.compose import entry_options
from automodel_cli.errors import UserError
from automodel_cli.registry import Entry, Registries
from automodel_cli.runtime import inside_torchrun


def make_launcher(registries: Registries, name: str) -> Launcher:
    """Instantiate the registered launcher ``name`` (unknown names were refused at resolve).

    The instance's ``name`` is the registered one, whatever its class says: options are read
    from ``launch.NAME`` and job records name the launcher by it."""
    factory = registries.launchers.get(name).load()
    launcher = factory() if callable(factory) else factory
    if not isinstance(launcher, Launcher):
        raise UserError(f"The launcher `{name}` from {registries.launchers.get(name).provider} is not "
                        f"a Launcher (got {type(launcher).__name__}).",
                        "Its plugin must register a subclass of automodel_cli.components.launch.base.Launcher.")
    launcher.name = name
    return launcher


def run_recipe(entry: Entry, cfg: Any, registries: Registries) -> int:
    """Run the recipe in this process: its target is called with a ``RecipeContext``."""
    from automodel_cli.context import RecipeContext

    return entry.load()(RecipeContext(cfg, registries, entry.name))


def build_spec(entry: Entry, cfg: Any, launcher: Launcher, registries: Registries) -> LaunchSpec:
    """Check the launch settings and describe the job; nothing is written yet."""
    launch = cfg.launch
    nproc = processes_per_node(cfg)
    env = launch.env.to_dict() if hasattr(launch.env, "to_dict") else dict(launch.env or {})
    bad_env = [name for name in env if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(name))]
    if bad_env:
        raise _launch_error(cfg, "launch.env", f"launch.env has invalid variable names: {', '.join(map(str, bad_env))}.")
    options = entry_options(cfg, registries.launchers, launcher.name)
    spec = LaunchSpec(
        recipe=entry.name, config=cfg, nodes=launch.nodes, nproc_per_node=nproc,
        gpus_per_node=launch.gpus_per_node or 0,
        job_name=launch.job_name or "", env={str(k): str(v) for k, v in env.items()},
        setup=[str(line) for line in launch.setup], rdzv_port=launch.rdzv_port, options=options,
        run_here=lambda: run_recipe(entry, cfg, registries),
    )
    refuse_credentials(cfg, spec, launcher)  # first: nothing below may print a credential
    spec.mesh, spec.auto_layout = resolve_mesh(entry.name, cfg, processes=nproc, local=not launcher.requests_gpus,
                                               registries=registries)
    launcher.check(spec)
    if launcher.uses_frozen_config(spec):  # what would otherwise fail in the queue
        problems = job_problems(entry.name, cfg, spec, launcher, plan_types=registries.parallel_plans.names())
        if problems:
            raise ConfigError(problems)
    return spec


def processes_per_node(cfg: Any) -> int:
    """Processes the job starts on each node (ranges: the config schema)."""
    return cfg.launch.nproc_per_node or cfg.launch.gpus_per_node or 1


def resolve_mesh(recipe: str, cfg: Any, *, processes: int, local: bool, registries: Registries | None = None
                 ) -> tuple[MeshShape, Any]:
    """(the job's mesh, the automatic layout or None). With ``distributed.auto=true`` the layout
    is chosen first and written into ``cfg`` (``training/auto_layout.py``), so the frozen config
    holds its sizes. ``local``: the processes run on this machine."""
    from automodel_cli.training.auto_layout import auto_layout

    layout = auto_layout(cfg, recipe, nodes=cfg.launch.nodes, processes_per_node=processes, local=local,
                         registries=registries)
    return job_mesh(cfg, cfg.launch.nodes * processes), layout


def job_mesh(cfg: Any, world_size: int) -> MeshShape:
    """The mesh must fit the job's processes: refuse before submitting, not on the cluster."""
    dist = cfg.distributed
    return MeshShape.resolve(dist.dp_replicate, dist.dp_shard, dist.tp, world_size=world_size, ep=dist.ep,
                              cp=dist.cp, pp=dist.pp)


def _launch_error(cfg: Any, dotted: str, message: str) -> UserError:
    source = cfg.source_of(dotted)
    return UserError(f"{source}: {message}" if source else message,
                     "Fix the value (see `automodel config show`); docs/launch.md describes the launch keys.")


def start(entry: Entry, cfg: Any, registries: Registries, *, dry_run: bool,
          echo: Callable[[str], None], memory_plan: Callable[[LaunchSpec, Launcher], str] | None = None) -> int:
    """Run, print (--dry-run) or submit the recipe's job; returns the exit code. ``memory_plan``
    gives the comment lines of the job's memory plan that --dry-run prints after the mesh."""
    if inside_torchrun():
        return run_recipe(entry, cfg, registries)
    launcher = make_launcher(registries, cfg.launch.launcher)
    spec = build_spec(entry, cfg, launcher, registries)
    if dry_run:
        rendered = launcher.render(spec)
        echo(f"# resolved config ({spec.describe()}, launcher {launcher.name})\n")
        echo(f"# mesh: {spec.describe_mesh()}\n")
        if spec.auto_layout is not None:
            echo("".join(f"# {line}\n" for line in spec.auto_layout.lines()))
        if memory_plan is not None:
            echo(memory_plan(spec, launcher))
        echo(cfg.to_yaml(with_sources=True))
        if rendered:
            echo(f"\n# ---- {launcher.name}: what would be submitted (nothing was) ----\n")
            echo(rendered if rendered.endswith("\n") else rendered + "\n")
        return 0
    if spec.auto_layout is not None:
        echo("\n".join(spec.auto_layout.lines()) + "\n")
    return launcher.launch(spec)
