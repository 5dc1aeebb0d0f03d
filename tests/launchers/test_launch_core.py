"""The launcher layer: --launcher/--nodes, `automodel launch FILE`, job records, plugin launchers.

The third-party launcher here is a real one: it starts the job in the background on this
machine (a detached torchrun), records it, and reports, prints and cancels it, exactly as a
cluster launcher plugin would with its scheduler.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from automodel_cli import hookimpl
from automodel_cli.components.launch.base import JobRecord, Launcher, LaunchSpec, find_job
from automodel_cli.config.schema import Key

CPU_ENV = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    """Job index in a temp dir, so tests never touch ~/.local/state."""
    path = tmp_path / "state"
    monkeypatch.setenv("AUTOMODEL_STATE_DIR", str(path))
    return path


# ----------------------------------------------------------------- a launcher from a plugin
PROCESSES: dict[str, subprocess.Popen] = {}


class BackgroundLauncher(Launcher):
    """Starts the job as a detached torchrun on this machine and tracks it by process id."""

    name = "background"
    options = {"log_name": Key((str,), "output.log", "File under launch/ for the job's output.")}

    def command(self, spec: LaunchSpec, config_path: str) -> list[str]:
        return spec.torchrun_command(python=sys.executable, config_path=config_path,
                                     rdzv_host="localhost", rdzv_id="background")

    def render(self, spec: LaunchSpec) -> str:
        return shlex.join(self.command(spec, "<frozen config>"))

    def launch(self, spec: LaunchSpec) -> int:
        spec.prepare_job_dir()
        frozen = spec.freeze()
        log_path = spec.launch_dir / spec.options["log_name"]
        with open(log_path, "w") as log:
            process = subprocess.Popen(self.command(spec, str(frozen)), stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, **CPU_ENV, **spec.env}, start_new_session=True)
        PROCESSES[str(process.pid)] = process
        JobRecord(launcher=self.name, job_id=str(process.pid), job_dir=str(spec.job_dir),
                  recipe=spec.recipe, job_name=spec.job_name or spec.job_dir.name,
                  details={"log": str(log_path)}).save()
        print(f"started background job {process.pid} in {spec.job_dir}")
        return 0

    def status(self, record: JobRecord) -> str:
        code = PROCESSES[record.job_id].poll()
        return "RUNNING" if code is None else f"EXITED {code}"

    def logs(self, record: JobRecord, follow: bool) -> int:
        if follow:
            PROCESSES[record.job_id].wait()
        print(Path(record.details["log"]).read_text(), end="")
        return 0

    def cancel(self, record: JobRecord) -> str:
        os.killpg(PROCESSES[record.job_id].pid, signal.SIGTERM)
        return f"sent SIGTERM to background job {record.job_id}"


@hookimpl
def register_launchers(registry):
    registry.add("background", BackgroundLauncher, description="Detached torchrun on this machine.")


PLUGIN = types.SimpleNamespace(__name__="background_launcher", register_launchers=register_launchers)

TINY = ("train.max_steps=3", "train.global_batch_size=4", "train.micro_batch_size=2",
        "logging.progress=false", "data.eval_size=0")


def wait_for(process: subprocess.Popen, timeout: float = 240) -> int:
    return process.wait(timeout=timeout)


# ------------------------------------------------------------------------------ the tests
def test_local_launcher_refuses_several_nodes(cli, tmp_path):
    result = cli("finetune", "demo", "--nodes", "2", "-o", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert "--nodes 2" in result.stderr and "--launcher slurm" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_launcher_lists_the_available_ones(cli):
    result = cli("finetune", "demo", "--launcher", "slrum")
    assert result.exit_code == 2
    assert "unknown launcher `slrum`. Did you mean `slurm`?" in result.stderr
    assert "Available: k8s, local, slurm" in result.stderr


def test_gpus_per_node_sets_processes_and_request(cli):
    result = cli("finetune", "demo", "--gpus-per-node", "4", "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert "gpus_per_node: 4 # from command line `--gpus-per-node`" in result.stdout
    assert "nproc_per_node: 4 # from command line `--gpus-per-node`" in result.stdout
    conflict = cli("finetune", "demo", "--gpus-per-node", "4", "--nproc-per-node", "2")
    assert conflict.exit_code == 2 and "disagree" in conflict.stderr


def test_mesh_is_checked_against_all_nodes_before_submitting(automodel_plugin, cli, tmp_path):
    automodel_plugin(PLUGIN)
    run = tmp_path / "run"
    ok = cli("finetune", "demo", "--launcher", "background", "--nodes", "2", "--nproc-per-node", "2",
             "distributed.tp=2", "distributed.dp_shard=2", "--dry-run", "-o", str(run))
    assert ok.exit_code == 0, ok.stderr  # (tp=4 would not divide the demo model's 2 key/value heads)
    assert "--nnodes=2" in ok.stdout and "--rdzv-backend=c10d" in ok.stdout
    bad = cli("finetune", "demo", "--launcher", "background", "--nodes", "2", "--nproc-per-node", "2",
              "distributed.tp=3", "-o", str(run))
    assert bad.exit_code == 2 and "4 process" in bad.stderr
    assert not run.exists()


def test_plugin_launcher_runs_tracks_and_cancels_jobs(automodel_plugin, cli, tmp_path):
    automodel_plugin(PLUGIN)
    listed = cli("list", "launchers")
    assert "background" in listed.stdout

    run = tmp_path / "run"
    submitted = cli("finetune", "demo", "--launcher", "background", "-o", str(run), *TINY)
    assert submitted.exit_code == 0, submitted.stderr
    record = json.loads((run / "launch" / "job.json").read_text())
    assert record["launcher"] == "background" and record["recipe"] == "finetune"
    frozen = (run / "launch" / "config.yaml").read_text()
    assert "launcher: background" in frozen and "resume: auto" in frozen
    assert f"output_dir: {run}" in frozen

    assert wait_for(PROCESSES[record["job_id"]]) == 0
    assert (run / "final" / "config.json").exists()
    status = cli("launch", "status", record["job_id"])
    assert status.exit_code == 0 and "EXITED 0" in status.stdout
    by_dir = cli("launch", "status", str(run))
    assert by_dir.exit_code == 0 and f"background job {record['job_id']}" in by_dir.stdout
    logs = cli("launch", "logs", f"background:{record['job_id']}")
    assert "saved" in logs.stdout
    assert record["job_id"] in cli("launch", "list").stdout

    # A longer run, cancelled once it trains: it checkpoints and stops with 128 + SIGTERM.
    long_run = tmp_path / "long"
    cli("finetune", "demo", "--launcher", "background", "-o", str(long_run), "train.max_steps=100000",
        "logging.progress=false", "data.eval_size=0")
    job_id = find_job(str(long_run)).job_id
    deadline = time.time() + 180
    metrics = long_run / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        assert PROCESSES[job_id].poll() is None, (long_run / "launch" / "output.log").read_text()
        time.sleep(0.5)
    cancelled = cli("launch", "cancel", str(long_run))
    assert "sent SIGTERM" in cancelled.stdout
    assert wait_for(PROCESSES[job_id]) != 0  # torchrun reports its stopped workers as failed
    assert "a checkpoint was saved" in (long_run / "launch" / "output.log").read_text()
    assert list((long_run / "checkpoints").glob("step_*"))
    assert not (long_run / "final").exists()


def test_launch_file_runs_the_recipe_it_names(automodel_plugin, cli, tmp_path):
    automodel_plugin(PLUGIN)
    job = tmp_path / "job.yaml"
    job.write_text("recipe: finetune\nmodel:\n  path: demo-model\ndata:\n  name: demo\nlaunch:\n  launcher: background\n"
                   "  nodes: 2\n  nproc_per_node: 2\n  background:\n    log_name: train.log\n")
    result = cli("launch", str(job), "--dry-run", "-o", str(tmp_path / "run"), "train.seed=3")
    assert result.exit_code == 0, result.stderr
    assert "launcher background" in result.stdout and "finetune, 2 nodes x 2 processes" in result.stdout
    assert "-m automodel_cli finetune" in result.stdout
    # Only the launch section changes between local and cluster runs.
    local = cli("launch", str(job), "--dry-run", "launch.launcher=local", "launch.nodes=1")
    assert local.exit_code == 0, local.stderr
    assert "launcher local" in local.stdout
    assert not (tmp_path / "run").exists()


def test_launch_file_errors(automodel_plugin, cli, tmp_path):
    automodel_plugin(PLUGIN)
    no_recipe = tmp_path / "a.yaml"
    no_recipe.write_text("model:\n  path: x\n")
    result = cli("launch", str(no_recipe))
    assert result.exit_code == 2 and "recipe: finetune" in result.stderr

    typo = tmp_path / "b.yaml"
    typo.write_text("model:\n  path: x\nrecipe: fintune\n")
    result = cli("launch", str(typo))
    assert result.exit_code == 2
    assert f"{typo}:3: unknown recipe `fintune`. Did you mean `finetune`?" in result.stderr

    option = tmp_path / "c.yaml"
    option.write_text("recipe: finetune\nlaunch:\n  launcher: background\n  background:\n    log_nme: x\n")
    result = cli("launch", str(option))
    assert result.exit_code == 2
    assert f"{option}:5" in result.stderr and "Did you mean `launch.background.log_name`?" in result.stderr

    mismatch = tmp_path / "d.yaml"
    mismatch.write_text("recipe: finetune\n")
    result = cli("finetune", str(mismatch), "recipe=other")
    assert result.exit_code == 2 and "is for the `other` recipe, not `finetune`" in result.stderr


def test_unknown_job_is_a_clear_error(cli):
    result = cli("launch", "status", "424242")
    assert result.exit_code == 2
    assert "No job `424242` is known here" in result.stderr and "Traceback" not in result.stderr
