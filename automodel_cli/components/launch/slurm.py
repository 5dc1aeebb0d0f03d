"""The Slurm launcher: one batch job per run, submitted with ``sbatch``.

``--launcher slurm`` writes the job directory (the run's output directory, on a filesystem every
node sees) and submits ``launch/job.sbatch``:

* ``#SBATCH`` lines from ``launch.*`` and ``launch.slurm.*`` (nodes, GPUs, partition, account,
  qos, time, cpus, memory, exclusive, extra lines), the log ``launch/slurm-%j.out`` (appended to
  across restarts), ``--signal=B:USR1@GRACE`` (a warning to the batch shell GRACE seconds before
  the time limit) and ``--requeue``;
* ``launch.env`` exports, run by the batch shell on the first node (``$NAME``/``${NAME}``
  references expand there, when the job starts; ``srun`` passes the environment to every node),
  and ``launch.setup`` commands, run by each node's task before torchrun;
* ``srun --ntasks-per-node=1 ...``: one ``torchrun`` per node, ``--standalone`` on one node,
  c10d rendezvous on the first node of the allocation (rendezvous id = job id) on several;
  with ``container_image`` pyxis starts it inside the container;
* a stop path: on USR1 (the time-limit warning, or ``PreemptParameters=send_user_signal``) or
  SIGTERM the batch shell sends SIGTERM to the training step (``scancel --signal=TERM JOBID``
  reaches torchrun and every rank; sending it to ``srun`` would make srun SIGKILL the step), the
  ranks save a checkpoint and exit, and when this run wrote a new checkpoint and has not
  finished, the script runs ``scontrol requeue``: the job goes back to the queue with the same id
  and its frozen config (``checkpoint.resume=auto``) continues from the latest checkpoint. At
  most ``max_requeues`` restarts (``SLURM_RESTART_COUNT``).

``automodel launch status|logs|cancel`` use ``scontrol``/``squeue``/``scancel`` and the job
directory (``summary.json``: finished; ``launch/error.txt``: the user error a rank reported).
No torch here: rendering and submitting must work on a login node.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from automodel_cli.run_layout import RunDir
from automodel_cli.components.launch.base import (
    ERROR_FILE,
    FROZEN_CONFIG,
    JobRecord,
    Launcher,
    LaunchSpec,
    _first_source,
    default_python,
    print_follow_commands,
    require_binary,
    run_tool,
)
from automodel_cli.components.launch.secrets import REFERENCE, references
from automodel_cli.components.launch.torchrun import ERROR_FILE_ENV
from automodel_cli.config.schema import OPT_INT, OPT_STR, Key, NoneType, _k
from automodel_cli.config.yaml_io import write_text_atomic
from automodel_cli.errors import UserError

SCRIPT = "job.sbatch"
LOG_PATTERN = "slurm-%j.out"
DOCS = "docs/launch.md (section Slurm) describes every launch.slurm option."
SBATCH_HINT = ("Run this on a Slurm login node (sbatch, squeue, scontrol and scancel on PATH), or "
               "use --dry-run to print the batch script and submit it yourself.")
#: Job states in which a job may still produce output (squeue's long names).
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
                 "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED",
                 "RESV_DEL_HOLD", "SPECIAL_EXIT"}
NODE_SCRIPT_END = "AUTOMODEL_NODE_SCRIPT"
_HEAD = "@@HEAD_NODE@@"
_JOB_ID = "@@JOB_ID@@"



#: ``launch.slurm.*``. docs/launch.md has the same table.
OPTIONS: dict[str, Key] = {
    "partition": _k(OPT_STR, None, "Partition (`--partition`); default: the cluster's default partition."),
    "account": _k(OPT_STR, None, "Account charged for the job (`--account`)."),
    "qos": _k(OPT_STR, None, "Quality of service (`--qos`)."),
    "time": _k((str, int, NoneType), None, "Time limit (`--time`): minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS; default: the partition's."),
    "cpus_per_task": _k(OPT_INT, None, "CPUs per node for torchrun and its ranks (`--cpus-per-task`, one task per node).", ge=1),
    "mem": _k((str, int, NoneType), None, "Memory per node (`--mem`): an integer with an optional K, M, G or T suffix (default unit M); 0: all of it."),
    "exclusive": _k(bool, False, "Whole nodes for the job (`--exclusive`)."),
    "container_image": _k(OPT_STR, None, "Run torchrun inside this container with pyxis/enroot (`srun --container-image`)."),
    "container_mounts": _k((list, str, NoneType), None, "Extra pyxis mounts (`SRC:DST[:FLAGS]`, list or comma-separated); the job directory is always mounted at its own path."),
    "extra_sbatch": _k(list, [], "More `#SBATCH` lines, each `--flag=value` (or a whole `#SBATCH ...` line): `--constraint=a100`, `--reservation=...`."),
    "python": _k(OPT_STR, None, "Interpreter that runs torchrun on the nodes; default: this one (`sys.executable`), or `python` inside a container."),
    "signal_grace": _k(int, 300, "Seconds before the time limit at which Slurm warns the job (USR1) so it can checkpoint and requeue; 0: no warning.", ge=0),
    "requeue": _k(bool, True, "Requeue the job after it stopped on the warning signal or SIGTERM and saved a checkpoint (`--requeue`, `scontrol requeue`)."),
    "max_requeues": _k(int, 20, "Most restarts the job asks for itself (counted by SLURM_RESTART_COUNT).", ge=0),
}

_TIME = re.compile(r"^(?:(?P<d>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
                   r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$")
_MEM = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)


def time_limit_seconds(value: Any) -> int | None:
    """Seconds of a Slurm time limit; None for unlimited; ValueError when it is not one."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(value)
        return value * 60
    text = str(value).strip()
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    match = _TIME.match(text)
    if not match:
        raise ValueError(value)
    g = {k: int(v) for k, v in match.groupdict().items() if v is not None}
    if "d" in g:
        return ((g["d"] * 24 + g["dh"]) * 60 + g.get("dm", 0)) * 60 + g.get("ds", 0)
    if "c" in g:  # HH:MM:SS
        return (g["a"] * 60 + g["b"]) * 60 + g["c"]
    if "b" in g:  # MM:SS
        return g["a"] * 60 + g["b"]
    return g["a"] * 60  # minutes


def _mounts(value: Any) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(item).strip() for item in items if str(item).strip()]


def _sbatch_line(item: str) -> str:
    text = item.strip()
    if text.startswith("#SBATCH"):
        text = text[len("#SBATCH"):].strip()
    return text


def env_word(value: str) -> str:
    """A ``launch.env`` value as a bash word: ``$NAME`` and ``${NAME}`` expand when the job starts,
    ``$$`` is a literal ``$``, and nothing else is special (no command substitution, no globbing)."""
    if "$" not in value:
        return shlex.quote(value)
    parts, position = [], 0
    for match in re.finditer(r"\$\$|" + REFERENCE.pattern, value):
        parts.append(_double_quoted(value[position:match.start()]))
        parts.append("\\$" if match.group(0) == "$$" else "${" + (match.group(1) or match.group(2)) + "}")
        position = match.end()
    parts.append(_double_quoted(value[position:]))
    return '"' + "".join(parts) + '"'


def _double_quoted(text: str) -> str:
    return re.sub(r'([\\"$`])', r"\\\1", text)


def _shell(args: list[str]) -> str:
    """Quote a command for bash, turning the placeholders into variable expansions."""
    return " ".join(shlex.quote(arg).replace(_HEAD, '"${AUTOMODEL_HEAD_NODE}"').replace(_JOB_ID, '"${SLURM_JOB_ID}"')
                    for arg in args)


class SlurmLauncher(Launcher):
    name = "slurm"
    options = OPTIONS
    requests_gpus = True
    shell_env = True  # the batch shell exports launch.env: ${NAME} references expand on the node

    def secret_hint(self, name: str) -> str:
        return (f"Export {name} in the shell you submit from (`export {name}=...`, or from a file: "
                f"`export {name}=$(cat ~/.secrets/{name.lower()})`): sbatch passes that environment to the job "
                f"(--export=ALL, Slurm's default) and srun passes it to every node, so launch.env need not name "
                f"it. To take it from a variable when the job starts write a reference, "
                f"launch.env.{name}='${{{name}}}' (expanded by the batch shell on the node); to read a file on "
                f"the node, a launch.setup line such as 'export {name}=$(cat /shared/secrets/{name.lower()})'. "
                f"docs/launch.md (section Secrets).")

    def local_path(self, spec: LaunchSpec, path: str) -> str | None:
        """The nodes see this machine's filesystem (the job directory is shared too); inside a
        container only what ``container_mounts`` maps, so a path there is found at its source."""
        if not spec.options.get("container_image"):
            return path
        if not os.path.isabs(path):
            return None  # the container's working directory is the image's
        for mount in _mounts(spec.options.get("container_mounts")):
            source, _, rest = mount.partition(":")
            target = rest.split(":")[0] or source
            if path == target or path.startswith(target.rstrip("/") + "/"):
                return source.rstrip("/") + path[len(target.rstrip("/")):]
        return None  # inside the image

    # ------------------------------------------------------------------------ checks
    def check(self, spec: LaunchSpec) -> None:
        cfg, opts = spec.config, spec.options
        problems: list[tuple[str, str]] = []

        def problem(key: str, message: str) -> None:
            problems.append((f"{self.options_path}.{key}", message))

        for key in ("partition", "account", "qos", "container_image", "python"):
            value = opts.get(key)
            if value is not None and (not str(value).strip() or re.search(r"\s", str(value))):
                problem(key, f"`{self.options_path}.{key}` must be a non-empty word without spaces, got {value!r}.")
        limit: int | None = None
        if opts.get("time") is not None:
            try:
                limit = time_limit_seconds(opts["time"])
            except ValueError:
                problem("time", f"`{self.options_path}.time` must be a Slurm time limit (minutes, MM:SS, "
                                f"HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS), got {opts['time']!r}.")
            else:
                if limit == 0:
                    problem("time", f"`{self.options_path}.time` must be longer than 0, got {opts['time']!r}.")
        mem = opts.get("mem")
        if mem is not None and (isinstance(mem, bool) or (isinstance(mem, int) and mem < 0)
                                or not _MEM.match(str(mem).strip())):
            problem("mem", f"`{self.options_path}.mem` must be a memory size such as 64G, 512000M or 0 "
                           f"(all of the node's memory), got {mem!r}.")
        grace = opts.get("signal_grace")
        if grace is not None and grace < 0:
            problem("signal_grace", f"`{self.options_path}.signal_grace` must be 0 or more seconds, got {grace}.")
        elif grace is not None and grace > 65535:
            problem("signal_grace", f"`{self.options_path}.signal_grace` must be at most 65535 seconds (Slurm's "
                                    f"limit for --signal), got {grace}.")
        elif grace and limit and grace >= limit:
            problem("signal_grace", f"`{self.options_path}.signal_grace` ({grace} s) must be shorter than the "
                                    f"time limit ({opts['time']!r} = {limit} s).")
        if opts.get("max_requeues") is not None and opts["max_requeues"] < 0:
            problem("max_requeues", f"`{self.options_path}.max_requeues` must be 0 or more, got {opts['max_requeues']}.")
        mounts = opts.get("container_mounts")
        if isinstance(mounts, list) and not all(isinstance(m, str) for m in mounts):
            problem("container_mounts", f"`{self.options_path}.container_mounts` must list SRC:DST strings, got {mounts!r}.")
        elif mounts is not None and any(re.search(r"\s", m) for m in _mounts(mounts)):
            problem("container_mounts", f"`{self.options_path}.container_mounts` entries must not contain spaces: {mounts!r}.")
        if mounts is not None and not opts.get("container_image"):
            problem("container_mounts", f"`{self.options_path}.container_mounts` needs "
                                        f"`{self.options_path}.container_image`.")
        for item in opts.get("extra_sbatch") or []:
            line = _sbatch_line(item) if isinstance(item, str) else None
            if not line or "\n" in line or not line.startswith("-"):
                problem("extra_sbatch", f"`{self.options_path}.extra_sbatch` items must be sbatch flags such "
                                        f"as `--constraint=a100` (or `#SBATCH --constraint=a100`), got {item!r}.")
        if any(line.strip() == NODE_SCRIPT_END for line in spec.setup):
            problems.append(("launch.setup", f"`launch.setup` must not contain the line {NODE_SCRIPT_END}."))
        if spec.job_name and re.search(r"\s", spec.job_name):
            problems.append(("launch.job_name", f"`launch.job_name` must not contain spaces, got {spec.job_name!r}."))
        if problems:
            raise self._problems(cfg, problems)
        for name, value in spec.env.items():
            for reference in references(value):
                if not reference.startswith("SLURM") and reference not in os.environ:
                    print(f"warning: launch.env.{name} refers to ${reference}, which is not set in this shell; "
                          f"the job's batch shell stops on an unset variable unless the cluster sets it.",
                          file=sys.stderr)

    def _problems(self, cfg: Any, problems: list[tuple[str, str]]) -> UserError:
        lines = []
        for dotted, message in problems:
            source = cfg.source_of(dotted) or _first_source(cfg, dotted)
            lines.append(f"{source}: {message}" if source else message)
        if len(lines) == 1:
            return UserError(lines[0], f"Fix the value (see `automodel config show`); {DOCS}")
        body = "\n".join(f"  - {line}" for line in lines)
        return UserError(f"The Slurm options have {len(lines)} problems:\n{body}\n",
                         f"Fix the values (see `automodel config show`); {DOCS}")

    # ------------------------------------------------------------------------ script
    def render(self, spec: LaunchSpec) -> str:
        """The batch script (nothing is written: the job directory is only chosen)."""
        spec.prepare_job_dir()
        return self.script(spec)

    def script(self, spec: LaunchSpec) -> str:
        from automodel_cli import __version__

        opts = spec.options
        job_dir = Path(spec.job_dir)
        launch_dir = job_dir / "launch"
        for what, path in (("job directory", str(job_dir)), ("working directory", os.getcwd())):
            if re.search(r"\s", path):
                raise UserError(f"The {what} `{path}` contains whitespace, which #SBATCH lines cannot hold.",
                                "Choose an --output-dir (and submit from a directory) without spaces.")
        container = opts.get("container_image")
        python = opts.get("python") or ("python" if container else default_python())
        q = shlex.quote
        grace = int(opts.get("signal_grace") or 0)
        requeue = bool(opts.get("requeue"))

        sbatch = [f"--job-name={spec.job_name or job_dir.name}", f"--nodes={spec.nodes}",
                  "--ntasks-per-node=1"]
        if spec.gpus_per_node > 0:
            sbatch.append(f"--gpus-per-node={spec.gpus_per_node}")
        for key, flag in (("cpus_per_task", "cpus-per-task"), ("mem", "mem"), ("partition", "partition"),
                          ("account", "account"), ("qos", "qos"), ("time", "time")):
            if opts.get(key) is not None:
                sbatch.append(f"--{flag}={str(opts[key]).strip()}")
        if opts.get("exclusive"):
            sbatch.append("--exclusive")
        sbatch += [f"--chdir={os.getcwd()}", f"--output={launch_dir / LOG_PATTERN}", "--open-mode=append"]
        if grace:
            sbatch.append(f"--signal=B:USR1@{grace}")
        sbatch.append("--requeue" if requeue else "--no-requeue")
        sbatch += [_sbatch_line(item) for item in opts.get("extra_sbatch") or []]

        srun = ["srun", "--nodes=" + str(spec.nodes), "--ntasks=" + str(spec.nodes), "--ntasks-per-node=1",
                "--kill-on-bad-exit=1"]
        if opts.get("cpus_per_task") is not None:
            srun.append(f"--cpus-per-task={opts['cpus_per_task']}")
        if spec.gpus_per_node > 0:
            srun.append(f"--gpus-per-node={spec.gpus_per_node}")
        if container:
            srun.append(f"--container-image={container}")
            mounts = _mounts(opts.get("container_mounts"))
            if not any(m.split(":")[0].rstrip("/") == str(job_dir) for m in mounts):
                mounts.append(f"{job_dir}:{job_dir}")
            srun.append("--container-mounts=" + ",".join(mounts))
        torchrun = spec.torchrun_command(python=python, config_path=str(launch_dir / FROZEN_CONFIG),
                                         rdzv_host=_HEAD, rdzv_id=_JOB_ID)

        if spec.setup:  # each node's task runs the setup lines, then becomes torchrun
            node = ["set -euo pipefail", *spec.setup, "exec " + _shell(torchrun)]
            launch_lines = ["  # Every node (one srun task each) runs launch.setup, then torchrun.",
                            f"  node_script=$(cat <<'{NODE_SCRIPT_END}'", *node, NODE_SCRIPT_END,
                            "  )",
                            "  " + _shell(srun) + ' bash -c "$node_script" &']
        else:
            launch_lines = ["  " + _shell(srun) + " \\", "    " + _shell(torchrun) + " &"]

        env = {**spec.env}
        env.setdefault("PYTHONUNBUFFERED", "1")
        if grace:  # torchrun waits this long for the ranks' checkpoint before it SIGKILLs them
            env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(grace))

        out: list[str] = ["#!/bin/bash",
                          f"# automodel-cli {__version__}: {spec.describe()}, submitted by "
                          f"`automodel ... --launcher slurm`.",
                          f"# Job directory: {job_dir}   (frozen config: {launch_dir / FROZEN_CONFIG})"]
        out += [f"#SBATCH {line}" for line in sbatch]
        out += ["", "set -euo pipefail", "",
                f"JOB_DIR={q(str(job_dir))}",
                f"LAUNCH_DIR={q(str(launch_dir))}",
                f"REQUEUE={1 if requeue else 0}",
                f"MAX_REQUEUES={int(opts.get('max_requeues') or 0)}",
                'RESTARTS="${SLURM_RESTART_COUNT:-0}"',
                'log() { echo "[automodel $(date +%H:%M:%S)] $*"; }',
                "",
                "# Environment of every process (launch.env); srun passes it to every node.",
                f'export {ERROR_FILE_ENV}="$LAUNCH_DIR/{ERROR_FILE}"  # a rank writes its user error here']
        out += [f"export {name}={env_word(value)}" for name, value in env.items()]
        out += [
            "",
            f'rm -f "${ERROR_FILE_ENV}"',
            'AUTOMODEL_HEAD_NODE=$(set +o pipefail; scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
            "export AUTOMODEL_HEAD_NODE  # torchrun's rendezvous host: the first node of the allocation",
            'ckpt_before=$(cat "$JOB_DIR/checkpoints/latest" 2>/dev/null || true)',
            'log "job $SLURM_JOB_ID (restart $RESTARTS) on $SLURM_JOB_NODELIST; first node $AUTOMODEL_HEAD_NODE;'
            ' latest checkpoint: ${ckpt_before:-none}"',
            "",
            "# Stop: the time-limit warning (USR1) or SIGTERM. Ask every rank (through the training",
            "# step, not srun: srun answers SIGTERM with SIGKILL) to save a checkpoint and exit.",
            'stop_signal=""',
            "on_stop() {",
            '  [ -n "$stop_signal" ] && return 0',
            '  stop_signal=$1',
            '  log "received SIG$1: asking the ranks to save a checkpoint and stop' 
            ' (torchrun prints a SignalException traceback for it: expected)"',
            '  scancel --signal=TERM "$SLURM_JOB_ID" || true',
            "}",
            "trap 'on_stop USR1' USR1",
            "trap 'on_stop TERM' TERM",
            "",
            "status=0",
            'if [ -z "$stop_signal" ]; then',
            *launch_lines,
            "  srun_pid=$!",
            "  while :; do  # wait returns early when a trap runs; wait again until srun has exited",
            '    wait "$srun_pid" && status=0 || status=$?',
            '    kill -0 "$srun_pid" 2>/dev/null || break',
            "  done",
            "fi",
            "trap '' USR1 TERM",
            "",
            'if [ -f "$JOB_DIR/summary.json" ]; then',
            '  log "training finished: $JOB_DIR/final"',
            "  exit 0",
            "fi",
            'ckpt_after=$(cat "$JOB_DIR/checkpoints/latest" 2>/dev/null || true)',
            'if [ -n "$stop_signal" ]; then',
            '  log "training stopped (exit status $status); latest checkpoint: ${ckpt_after:-none}"',
            '  if [ "$REQUEUE" != 1 ]; then',
            '    log "not requeuing (launch.slurm.requeue is false)"',
            '  elif [ "$RESTARTS" -ge "$MAX_REQUEUES" ]; then',
            '    log "not requeuing: restarted $RESTARTS times already (launch.slurm.max_requeues=$MAX_REQUEUES)"',
            '  elif [ -n "${srun_pid:-}" ] && { [ -z "$ckpt_after" ] || [ "$ckpt_after" = "$ckpt_before" ]; }; then',
            '    log "not requeuing: this run saved no new checkpoint"',
            '  else',
            '    log "requeuing job $SLURM_JOB_ID (restart $((RESTARTS + 1)) of at most $MAX_REQUEUES);'
            ' it resumes from ${ckpt_after:-the start}"',
            '    if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi',
            '    log "scontrol requeue failed"',
            "  fi",
            "fi",
            f'if [ -s "${ERROR_FILE_ENV}" ]; then log "error: $(cat "${ERROR_FILE_ENV}")"; fi',
            '[ "$status" -ne 0 ] && log "training exited with status $status"',
            'exit "$status"',
        ]
        return "\n".join(out) + "\n"

    # ------------------------------------------------------------------------ launch
    def launch(self, spec: LaunchSpec) -> int:
        sbatch = require_binary("sbatch", self.name, SBATCH_HINT)
        job_dir = Path(spec.prepare_job_dir())
        existed = job_dir.exists()
        launch_existed = spec.launch_dir.exists()
        script_path = spec.launch_dir / SCRIPT
        try:
            spec.freeze()
            write_text_atomic(script_path, self.script(spec))
            output = run_tool([sbatch, "--parsable", str(script_path)], "Submitting the Slurm job (sbatch)",
                              f"Check the launch.slurm options (partition, account, qos, time, ...) against "
                              f"`sinfo`/`sacctmgr show assoc`; {DOCS} The script is printed by --dry-run.")
        except BaseException:
            _remove_written(job_dir, existed, launch_existed, [script_path, spec.launch_dir / FROZEN_CONFIG])
            raise
        job_id = output.strip().splitlines()[-1].split(";")[0].strip() if output.strip() else ""
        if not job_id:
            raise UserError(f"sbatch printed no job id (output: {output!r}).", SBATCH_HINT)
        log_path = spec.launch_dir / LOG_PATTERN.replace("%j", job_id)
        record = JobRecord(launcher=self.name, job_id=job_id, job_dir=str(job_dir), recipe=spec.recipe,
                           job_name=spec.job_name or job_dir.name,
                           details={"log": str(log_path), "script": str(script_path),
                                    "config": str(spec.launch_dir / FROZEN_CONFIG),
                                    "nodes": spec.nodes, "nproc_per_node": spec.nproc_per_node,
                                    "partition": spec.options.get("partition"),
                                    "cluster": output.strip().split(";")[1] if ";" in output else None})
        record.save()
        print(f"submitted slurm job {job_id} ({spec.describe()})")
        print(f"  job directory: {job_dir}")
        print(f"  batch script:  {script_path}")
        print(f"  log:           {log_path}")
        print_follow_commands(job_id)
        return 0

    # ------------------------------------------------------------------------ jobs
    def status(self, record: JobRecord) -> str:
        lines: list[str] = []
        info = _scontrol_job(record.job_id)
        if info:
            state = info.get("JobState", "?")
            reason = info.get("Reason", "None")
            lines.append(f"state: {state}" + (f" ({reason})" if reason not in ("None", "") else "")
                         + f", restarts {info.get('Restarts', '0')}, exit code {info.get('ExitCode', '?')}")
            nodes = info.get("NodeList", "?")
            lines.append(f"nodes: {nodes if nodes not in ('', '(null)') else '(none yet)'}, partition {info.get('Partition', '?')}, "
                         f"run time {info.get('RunTime', '?')} of {info.get('TimeLimit', '?')}")
        else:
            state = _sacct_state(record.job_id)
            if state:
                lines.append(f"state: {state} (sacct)")
            else:
                lines.append("state: not in Slurm's queue any more; from the job directory: "
                             + _finished_state(record))
        lines += _progress(record)
        lines.append(f"log: {_log_path(record)}")
        return "\n".join(lines) + "\n"

    def logs(self, record: JobRecord, follow: bool) -> int:
        path = _log_path(record)
        position = 0
        shown_wait = False
        while True:
            if path.exists():
                with path.open("rb") as handle:
                    handle.seek(position)
                    chunk = handle.read()
                if chunk:
                    position += len(chunk)
                    sys.stdout.write(chunk.decode("utf-8", errors="replace"))
                    sys.stdout.flush()
            if not follow:
                if not path.exists():
                    state = _queue_state(record.job_id)
                    print(f"No output yet: {path} does not exist (job {record.job_id} is "
                          f"{state or 'not in the queue'}).")
                return 0
            state = _queue_state(record.job_id)
            if state not in ACTIVE_STATES:
                if path.exists():  # the last lines written before the job left the queue
                    with path.open("rb") as handle:
                        handle.seek(position)
                        rest = handle.read()
                    sys.stdout.write(rest.decode("utf-8", errors="replace"))
                print(f"[automodel] job {record.job_id} is no longer in the queue: {_finished_state(record)}")
                sys.stdout.flush()
                return 0
            if not path.exists() and not shown_wait:
                print(f"[automodel] waiting for job {record.job_id} ({state}) to start writing {path} ...", flush=True)
                shown_wait = True
            time.sleep(1.0)

    def cancel(self, record: JobRecord) -> str:
        scancel = require_binary("scancel", self.name, SBATCH_HINT)
        state = _queue_state(record.job_id)
        if state not in ACTIVE_STATES:
            raise UserError(f"Slurm job {record.job_id} is not pending or running "
                            f"({'state ' + state if state else 'not in the queue any more'}), so there is "
                            f"nothing to cancel; from the job directory: {_finished_state(record)}.",
                            f"`automodel launch status {record.job_id}` shows what happened.")
        run_tool([scancel, record.job_id], f"Cancelling Slurm job {record.job_id} (scancel)",
                 f"Is it still in the queue? `automodel launch status {record.job_id}`.")
        latest = RunDir(record.job_dir).checkpoints / "latest"
        kept = latest.read_text(encoding="utf-8").strip() if latest.is_file() else None
        message = f"cancelled slurm job {record.job_id} (it was {state})"
        if kept:
            message += (f"; its latest checkpoint ({kept}) stays in {record.job_dir}/checkpoints. Continue it "
                        f"with `automodel launch {record.job_dir}/launch/{FROZEN_CONFIG}` (the frozen config "
                        f"resumes from the latest checkpoint).")
        return message


# ---------------------------------------------------------------------------- helpers
def _remove_written(job_dir: Path, existed: bool, launch_existed: bool, files: list[Path]) -> None:
    """Undo a failed submission: nothing half-made is left behind."""
    for path in files:
        path.unlink(missing_ok=True)
    launch_dir = job_dir / "launch"
    try:
        if not launch_existed and launch_dir.is_dir() and not any(launch_dir.iterdir()):
            launch_dir.rmdir()
        if not existed and job_dir.is_dir() and not any(job_dir.iterdir()):
            job_dir.rmdir()
    except OSError:
        pass


def _tool(name: str) -> str | None:
    return shutil.which(name)


def _run(command: list[str], timeout: float = 30) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _scontrol_job(job_id: str) -> dict[str, str]:
    """``scontrol show job -o ID`` as a mapping; {} when Slurm no longer knows the job."""
    scontrol = _tool("scontrol")
    done = _run([scontrol, "show", "job", "-o", job_id]) if scontrol else None
    if done is None or done.returncode != 0 or not done.stdout.strip():
        return {}
    first = done.stdout.strip().splitlines()[0]
    return dict(re.findall(r"(\w+)=(\S*)", first))


def _queue_state(job_id: str) -> str | None:
    """The job's state while Slurm knows it (squeue, then scontrol), else None."""
    squeue = _tool("squeue")
    done = _run([squeue, "-h", "-j", job_id, "-o", "%T"]) if squeue else None
    if done is not None and done.returncode == 0 and done.stdout.strip():
        return done.stdout.strip().splitlines()[0].strip()
    return _scontrol_job(job_id).get("JobState") or None


def _sacct_state(job_id: str) -> str | None:
    sacct = _tool("sacct")
    done = _run([sacct, "-n", "-X", "-P", "-j", job_id, "-o", "State,ExitCode"]) if sacct else None
    if done is None or done.returncode != 0 or not done.stdout.strip():
        return None
    state, _, code = done.stdout.strip().splitlines()[0].partition("|")
    return f"{state}, exit code {code}" if code else state


def _finished_state(record: JobRecord) -> str:
    job_dir = Path(record.job_dir)
    error = record.launch_dir / ERROR_FILE
    if RunDir(job_dir).summary.is_file():
        try:
            summary = json.loads(RunDir(job_dir).summary.read_text(encoding="utf-8"))
            final = summary.get("final") or str(RunDir(job_dir).final)
        except (OSError, ValueError):
            final = str(RunDir(job_dir).final)
        return f"finished; the model is in {final}"
    if error.is_file() and error.read_text(encoding="utf-8").strip():
        return f"failed: {error.read_text(encoding='utf-8').strip()}"
    latest = RunDir(job_dir).checkpoints / "latest"
    if latest.is_file():
        return (f"ended without finishing; latest checkpoint {latest.read_text(encoding='utf-8').strip()} "
                f"(`automodel launch {record.launch_dir / FROZEN_CONFIG}` resumes from it)")
    return "ended without finishing and without a checkpoint (see the log)"


def _progress(record: JobRecord) -> list[str]:
    job_dir = Path(record.job_dir)
    lines = []
    metrics = RunDir(job_dir).metrics
    if metrics.is_file():
        last = None
        for line in metrics.read_text(encoding="utf-8").splitlines():
            if line.strip():
                last = line
        if last:
            try:
                data = json.loads(last)
                lines.append(f"progress: step {data.get('step')}, loss {data.get('loss', float('nan')):.4f} (metrics.jsonl)")
            except (ValueError, TypeError):
                pass
    latest = RunDir(job_dir).checkpoints / "latest"
    if latest.is_file():
        lines.append(f"latest checkpoint: {job_dir / 'checkpoints' / latest.read_text(encoding='utf-8').strip()}")
    if RunDir(job_dir).final.is_dir():
        lines.append(f"final output: {job_dir / 'final'}")
    error = record.launch_dir / ERROR_FILE
    if error.is_file() and error.read_text(encoding="utf-8").strip():
        lines.append(f"error reported by a rank: {error.read_text(encoding='utf-8').strip()}")
    return lines


def _log_path(record: JobRecord) -> Path:
    log = record.details.get("log") if record.details else None
    return Path(log) if log else record.launch_dir / LOG_PATTERN.replace("%j", record.job_id)
