"""What every launcher shares: the job description, its options check, and the job record.

A launcher turns a resolved recipe config into running processes. ``local`` runs them here;
cluster launchers (``slurm``, ``k8s`` or a plugin's) write a job directory and hand the job to a
scheduler. Whatever the launcher, every process ends up running the same thing:
``torchrun ... -m automodel_cli RECIPE FROZEN_CONFIG``, where the frozen config is the resolved
config with the output directory fixed, so every node and every restart agrees on it.

No torch here: building, printing and submitting a job must stay fast and work on a login node.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from automodel_cli.run_layout import RunDir
from automodel_cli.config.resolve import ConfigError, Problem, value_problem
from automodel_cli.config.schema import Key
from automodel_cli.config.yaml_io import Source, write_text_atomic
from automodel_cli.errors import UserError, did_you_mean

LAUNCH_DIR = RunDir.LAUNCH
FROZEN_CONFIG = "config.yaml"
JOB_RECORD = "job.json"
ERROR_FILE = "error.txt"
#: Where job ids are mapped to job directories, so ``automodel launch status 1234`` works from
#: anywhere. Overridable for tests and shared installs.
STATE_DIR_ENV = "AUTOMODEL_STATE_DIR"


@dataclass
class LaunchSpec:
    """One job, as every launcher sees it.

    ``options`` are the launcher's own settings (``launch.NAME``: ``launch.slurm``,
    ``launch.k8s``, ...), validated with the config and completed with their defaults.
    ``run_here`` runs the recipe in this process (the local launcher's single-process case).
    ``job_name`` is empty unless the user named the job (launchers derive one from the job dir).
    """

    recipe: str
    config: Any  # ResolvedConfig
    nodes: int
    nproc_per_node: int
    gpus_per_node: int  # GPUs to request from a scheduler per node (0: none)
    job_name: str
    env: dict[str, str]
    setup: list[str]
    rdzv_port: int
    options: dict[str, Any]
    run_here: Callable[[], int]
    job_dir: Path | None = None
    mesh: Any = None  # the resolved MeshShape (set by build_spec)
    auto_layout: Any = None  # the automatic layout chosen for it (distributed.auto; set by build_spec)

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node

    @property
    def launch_dir(self) -> Path:
        assert self.job_dir is not None, "prepare_job_dir() first"
        return self.job_dir / LAUNCH_DIR

    def prepare_job_dir(self) -> Path:
        """Pick and vet the run's output directory (absolute: other nodes read it too).

        A directory holding another run is refused before anything is written."""
        from automodel_cli.training.run_dir import prepare_output_dir

        if self.job_dir is None:
            self.job_dir = prepare_output_dir(self.config, self.recipe).resolve()
        return self.job_dir

    def frozen_config_text(self, output_dir: str | None = None) -> str:
        """The config every process reads: output_dir fixed and ``checkpoint.resume=auto``.

        Cluster jobs are restarted by schedulers (preemption, requeue, node failure); with
        ``auto`` a restart continues from the latest checkpoint and a first start begins fresh.
        An explicit ``checkpoint.resume`` path is kept as given.
        """
        from automodel_cli.config.yaml_io import dump_yaml

        tree = self.config.tree
        saved = {"output_dir": tree.get("output_dir"), "resume": tree["checkpoint"].get("resume"),
                 "recipe": tree.get("recipe")}
        tree["output_dir"] = output_dir or str(self.job_dir)
        tree["recipe"] = self.recipe
        if saved["resume"] in (None, False, "off", "none", ""):
            tree["checkpoint"]["resume"] = "auto"
        try:
            frozen = self.config.redacted()
            # launch.env holds no credential (build_spec refused them), only references such as
            # ${HF_TOKEN}: keep them, so resubmitting this file runs the same job.
            env = (tree.get("launch") or {}).get("env") or {}
            frozen_env = (frozen.get("launch") or {}).get("env") or {}
            for name in frozen_env:
                frozen_env[name] = env.get(name, frozen_env[name])
            return dump_yaml(frozen)
        finally:
            tree["output_dir"], tree["recipe"] = saved["output_dir"], saved["recipe"]
            tree["checkpoint"]["resume"] = saved["resume"]

    def freeze(self, output_dir: str | None = None) -> Path:
        path = self.launch_dir / FROZEN_CONFIG
        write_text_atomic(path, self.frozen_config_text(output_dir))
        return path

    def torchrun_command(self, *, python: str, config_path: str, rdzv_host: str, rdzv_id: str,
                         node_rank: str | None = None) -> list[str]:
        """The command each node runs. One node: ``--standalone``; more: c10d rendezvous."""
        command = [python, "-m", "torch.distributed.run", f"--nproc-per-node={self.nproc_per_node}"]
        if self.nodes == 1:
            command.append("--standalone")
        else:
            command += [f"--nnodes={self.nodes}", "--rdzv-backend=c10d",
                        f"--rdzv-endpoint={rdzv_host}:{self.rdzv_port}", f"--rdzv-id={rdzv_id}"]
            if node_rank is not None:
                command.append(f"--node-rank={node_rank}")
        return command + ["-m", "automodel_cli", self.recipe, config_path]

    def describe(self) -> str:
        return f"{self.recipe}, {self._layout()}"

    def describe_mesh(self) -> str:
        """``dp_replicate=1 dp_shard=8 tp=1 (world size 8 = 1 node x 8 processes)``."""
        sizes = " ".join(f"{name}={size}" for name, size in self.mesh.as_dict().items())
        return f"{sizes} (world size {self.world_size} = {self._layout()})"

    def _layout(self) -> str:
        return (f"{self.nodes} node{'s' if self.nodes != 1 else ''} x "
                f"{self.nproc_per_node} process{'es' if self.nproc_per_node != 1 else ''}")


class Launcher:
    """Base class of launchers. Subclasses set ``name``/``options`` and implement ``launch``.

    Cluster launchers also implement ``render`` (the batch script or manifest printed by
    ``--dry-run``) and ``status``/``logs``/``cancel`` for the jobs they started.
    """

    name: ClassVar[str] = ""
    #: The launcher's option table: key -> Key (type, default, doc, choices, range), declared
    #: with the registry entry and read from ``launch.NAME`` (one file can carry the options of
    #: several launchers and switch between them by ``launch.launcher`` alone).
    options: ClassVar[dict[str, Key]] = {}

    #: False for launchers whose processes do not see this machine's files (k8s pods read the
    #: image and cluster volumes): then paths in the config are not checked here.
    shared_filesystem: ClassVar[bool] = True
    #: The launcher asks a scheduler for GPUs (``launch.gpus_per_node``): without
    #: ``--gpus-per-node`` a GPU-sized model is refused and a small one gets a warning.
    requests_gpus: ClassVar[bool] = False
    #: ``launch.env`` passes through a shell when the job starts (Slurm's batch script), so a value
    #: may be a reference, ``$NAME`` or ``${NAME}``, to a variable of that shell, e.g. a token
    #: exported before submitting. False: values reach the processes as written, so a
    #: credential-named variable is refused whatever its value (docs/launch.md, Secrets).
    shell_env: ClassVar[bool] = False

    @property
    def options_path(self) -> str:
        return f"launch.{self.name}"

    def secret_hint(self, name: str) -> str:
        """How to give the job the credential ``name`` with this launcher (the fix printed when
        a credential is refused)."""
        return (f"Give {name} to the job through the environment its processes start with (how depends "
                f"on the {self.name} launcher), not in the config. docs/launch.md (section Secrets).")

    def uses_frozen_config(self, spec: LaunchSpec) -> bool:
        """The job's processes run elsewhere, from the frozen config (``spec.freeze``): then the
        job is checked before it starts (no data, missing paths, credentials in the config)."""
        return True

    def local_path(self, spec: LaunchSpec, path: str) -> str | None:
        """Where the job's processes find ``path`` on this machine, or None when they read it
        somewhere this machine cannot look (then it is not checked before submitting)."""
        return path if self.shared_filesystem else None

    def check(self, spec: LaunchSpec) -> None:
        """Refuse what this launcher cannot run, before anything is written."""

    def render(self, spec: LaunchSpec) -> str | None:
        """What would be submitted (script or manifest), or None when there is nothing to show."""
        return None

    def launch(self, spec: LaunchSpec) -> int:
        raise NotImplementedError

    def status(self, record: JobRecord) -> str:
        raise UserError(f"The {self.name} launcher does not track jobs.", None)

    def logs(self, record: JobRecord, follow: bool) -> int:
        raise UserError(f"The {self.name} launcher does not track jobs.", None)

    def cancel(self, record: JobRecord) -> str:
        raise UserError(f"The {self.name} launcher does not track jobs.", None)


# ------------------------------------------------------------------------------- options
def _first_source(cfg: Any, dotted: str) -> Source | None:
    """The source of the first value recorded under ``dotted`` (a nested mapping option)."""
    for key, source in cfg.sources.items():
        if key.startswith(dotted + "."):
            return source
    return None


def option_error(cfg: Any, dotted: str, message: str, hint: str) -> UserError:
    """A UserError about one launcher option, naming where it was set."""
    source = cfg.source_of(dotted) or _first_source(cfg, dotted)
    where = f"{source}: " if source else ""
    return UserError(f"{where}{message}", hint)


# ---------------------------------------------------------------------------- job records
@dataclass
class JobRecord:
    """What ``automodel launch status|logs|cancel`` needs to find a job again.

    Kept as ``JOB_DIR/launch/job.json``; an index entry in the state directory maps the job id
    to that directory.
    """

    launcher: str
    job_id: str
    job_dir: str
    recipe: str
    job_name: str
    submitted_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def launch_dir(self) -> Path:
        return Path(self.job_dir) / LAUNCH_DIR

    def save(self) -> Path:
        path = self.launch_dir / JOB_RECORD
        write_text_atomic(path, json.dumps(asdict(self), indent=2) + "\n")
        index = state_dir() / "jobs"
        index.mkdir(parents=True, exist_ok=True)
        write_text_atomic(index / f"{self.launcher}-{_safe(self.job_id)}.json",
                          json.dumps({"job_dir": self.job_dir, "launcher": self.launcher,
                                      "job_id": self.job_id, "submitted_at": self.submitted_at}) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> JobRecord:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**data)
        except (OSError, ValueError, TypeError) as error:
            raise UserError(f"Cannot read the job record {path}: {error}.",
                            "It is written when a job is submitted; was this job directory "
                            "created by `automodel ... --launcher`?") from None


def state_dir() -> Path:
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "automodel"


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def find_job(job: str) -> JobRecord:
    """A job by directory (the run's output directory or its launch/ folder) or by job id."""
    path = Path(job).expanduser()
    for candidate in (path / LAUNCH_DIR / JOB_RECORD, path / JOB_RECORD, path):
        if candidate.is_file() and candidate.name == JOB_RECORD:
            return JobRecord.load(candidate)
    index = state_dir() / "jobs"
    launcher, _, job_id = job.rpartition(":")
    matches = []
    for entry in sorted(index.glob("*.json")) if index.is_dir() else []:
        try:
            data = json.loads(entry.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if data.get("job_id") == job_id and (not launcher or data.get("launcher") == launcher):
            matches.append(data)
    if len(matches) > 1:
        names = ", ".join(f"{m['launcher']}:{m['job_id']}" for m in matches)
        raise UserError(f"Job id `{job}` matches jobs of several launchers ({names}).",
                        "Name the launcher as LAUNCHER:ID, or pass the job directory.")
    if not matches:
        raise UserError(f"No job `{job}` is known here: it is neither a job directory nor a job id "
                        f"recorded in {index}.",
                        "Pass the job directory printed at submission (it holds launch/job.json), "
                        "or see `automodel launch list`.")
    record = JobRecord.load(Path(matches[0]["job_dir"]) / LAUNCH_DIR / JOB_RECORD)
    if record.job_id != job_id:
        raise UserError(f"Job {job_id} ran in {record.job_dir}, which has since been resubmitted as "
                        f"{record.launcher} job {record.job_id}.",
                        f"Use `automodel launch status {record.job_id}` for the current job; the "
                        f"scheduler's own tools still know the old one.")
    return record


def recent_jobs(limit: int = 20) -> list[dict[str, Any]]:
    index = state_dir() / "jobs"
    rows = []
    for entry in index.glob("*.json") if index.is_dir() else []:
        try:
            rows.append(json.loads(entry.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    rows.sort(key=lambda row: row.get("submitted_at", ""), reverse=True)
    return rows[:limit]


# --------------------------------------------------------------------------------- tools
def require_binary(name: str, launcher: str, hint: str) -> str:
    """The path of a command-line tool a launcher needs, or a clear error."""
    import shutil

    path = shutil.which(name)
    if path is None:
        raise UserError(f"The {launcher} launcher needs `{name}`, which is not on PATH.", hint)
    return path


def run_tool(command: list[str], what: str, hint: str, timeout: float = 120,
             input_text: str | None = None) -> str:
    """Run a scheduler tool; a failure becomes a UserError quoting the tool's own message."""
    import subprocess

    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, input=input_text)
    except subprocess.TimeoutExpired:
        raise UserError(f"{what} timed out after {timeout:.0f} s (`{shlex.join(command)}`).", hint) from None
    except OSError as error:
        raise UserError(f"{what} could not start `{command[0]}`: {error}.", hint) from None
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip() or f"exit code {done.returncode}"
        raise UserError(f"{what} failed: {message}", hint)
    return done.stdout


def print_follow_commands(job_id: str) -> None:
    """After a submission: the commands that follow, inspect and cancel the job."""
    print("follow it:")
    for verb in ("logs", "status", "cancel"):
        print(f"  automodel launch {verb} {job_id}{' --follow' if verb == 'logs' else ''}")


def default_python() -> str:
    """The interpreter running this command: on a shared filesystem every node can run it."""
    return sys.executable
