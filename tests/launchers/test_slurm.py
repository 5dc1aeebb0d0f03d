"""`--launcher slurm`: the batch script, bad input, and real jobs on a real single-node Slurm.

The offline tests need no Slurm. The cluster tests start slurmctld + slurmd on loopback
(tests/launchers/slurm_cluster.py; Debian's slurm-wlm) and submit real 2-process CPU (gloo)
fine-tunes of the demo model through `automodel finetune ... --launcher slurm`: a job that
finishes, a job that gets the time-limit warning signal, checkpoints, requeues itself and
resumes, a cancelled job and a rejected submission. Without Slurm they skip, unless
AUTOMODEL_REQUIRE_SLURM=1 (CI), where they fail.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

import slurm_cluster
from conftest import REPO, run_cli

CPU = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPU + gloo by design
SMALL = ["train.global_batch_size=16", "train.micro_batch_size=4", "data.eval_split=null",
         "train.eval_every_steps=null", "logging.progress=false", "model.dtype=float32"]
SLURM_FLAGS = ["--launcher", "slurm", "--nodes", "1", "--nproc-per-node", "2"]


@pytest.fixture
def state_dir(tmp_path) -> Path:
    return tmp_path / "state"


def cli(*args: str, state: Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120):
    return run_cli(*args, env={"AUTOMODEL_STATE_DIR": str(state), **CPU, **(env or {})}, cwd=cwd,
                   timeout=timeout)


def script_of(stdout: str) -> str:
    marker = "what would be submitted (nothing was) ----\n"
    assert marker in stdout, stdout[-3000:]
    return stdout.split(marker, 1)[1]


def sbatch_lines(script: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


def written(tmp_path: Path) -> list[str]:
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))


# ------------------------------------------------------------------------------ offline
def test_dry_run_prints_a_multi_node_batch_script_and_writes_nothing(tmp_path, state_dir):
    run = tmp_path / "run"
    result = cli("finetune", "llama3", "--peft", "lora", "--nodes", "4", "--gpus-per-node", "8",
                 "--launcher", "slurm", "--dry-run", "-o", str(run), "data.path=acme/sft-mix",
                 "launch.slurm.partition=gpu", "launch.slurm.account=proj42", "launch.slurm.qos=high",
                 "launch.slurm.time=1-12:00:00", "launch.slurm.cpus_per_task=64", "launch.slurm.mem=480G",
                 "launch.slurm.exclusive=true", "launch.slurm.container_image=nvcr.io/nvidia/pytorch:25.01-py3",
                 "launch.slurm.container_mounts=[/lustre/data:/data]",
                 "launch.slurm.extra_sbatch=[--constraint=h100, '#SBATCH --reservation=big']",
                 "launch.slurm.signal_grace=600", "launch.env.HF_HOME=/lustre/hf cache",
                 "launch.setup=[module load cuda/12.4, 'echo ready']", "launch.rdzv_port=29911",
                 state=state_dir, cwd=tmp_path)
    assert result.exit_code == 0, result.stderr
    script = script_of(result.stdout)
    assert script.startswith("#!/bin/bash\n")
    assert sbatch_lines(script) == [
        f"--job-name={run.name}", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8",
        "--cpus-per-task=64", "--mem=480G", "--partition=gpu", "--account=proj42", "--qos=high",
        "--time=1-12:00:00", "--exclusive", f"--chdir={tmp_path}",
        f"--output={run}/launch/slurm-%j.out", "--open-mode=append", "--signal=B:USR1@600",
        "--requeue", "--constraint=h100", "--reservation=big"]
    # One torchrun per node, c10d rendezvous on the first node of the allocation.
    assert ('AUTOMODEL_HEAD_NODE=$(set +o pipefail; scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)\n'
            'export AUTOMODEL_HEAD_NODE') in script
    srun = next(line for line in script.splitlines() if line.strip().startswith("srun "))
    assert srun.endswith('bash -c "$node_script" &')  # each node: launch.setup, then torchrun
    assert "--ntasks-per-node=1" in srun and "--nodes=4" in srun and "--ntasks=4" in srun
    assert "--gpus-per-node=8" in srun and "--cpus-per-task=64" in srun
    assert "--container-image=nvcr.io/nvidia/pytorch:25.01-py3" in srun
    assert f"--container-mounts=/lustre/data:/data,{run}:{run}" in srun
    node_script = script.split("<<'AUTOMODEL_NODE_SCRIPT'\n", 1)[1].split("\nAUTOMODEL_NODE_SCRIPT\n", 1)[0]
    setup, torchrun = node_script.splitlines()[:-1], node_script.splitlines()[-1]
    assert setup == ["set -euo pipefail", "module load cuda/12.4", "echo ready"]
    assert torchrun.startswith("exec python -m torch.distributed.run --nproc-per-node=8 --nnodes=4 --rdzv-backend=c10d")
    assert '--rdzv-endpoint="${AUTOMODEL_HEAD_NODE}":29911 --rdzv-id="${SLURM_JOB_ID}"' in torchrun
    assert torchrun.endswith(f"-m automodel_cli finetune {run}/launch/config.yaml")
    assert "--standalone" not in script
    # Environment, setup, and the stop/requeue path.
    assert "export HF_HOME='/lustre/hf cache'" in script
    assert "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600" in script
    assert 'export AUTOMODEL_LAUNCH_ERROR_FILE="$LAUNCH_DIR/error.txt"' in script
    assert "set -euo pipefail" in script
    assert "trap 'on_stop USR1' USR1" in script and 'scancel --signal=TERM "$SLURM_JOB_ID"' in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and "MAX_REQUEUES=20" in script
    # The resolved config comes first, and the script is valid bash.
    assert re.search(r"nodes: 4 +# from command line `--nodes`", result.stdout)
    syntax = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert syntax.returncode == 0, syntax.stderr
    assert written(tmp_path) == []


def test_dry_run_single_node_uses_standalone_torchrun_and_this_python(tmp_path, state_dir):
    import sys

    result = cli("finetune", "demo", *SLURM_FLAGS, "--dry-run", "-o", str(tmp_path / "run"),
                 "launch.slurm.requeue=false", "launch.slurm.signal_grace=0", "launch.job_name=tiny",
                 state=state_dir, cwd=tmp_path)
    assert result.exit_code == 0, result.stderr
    script = script_of(result.stdout)
    lines = sbatch_lines(script)
    assert "--job-name=tiny" in lines and "--nodes=1" in lines and "--no-requeue" in lines
    assert not any(line.startswith(("--gpus-per-node", "--signal", "--partition", "--time")) for line in lines)
    assert f"    {sys.executable} -m torch.distributed.run --nproc-per-node=2 --standalone -m automodel_cli finetune" in script
    assert "node_script" not in script  # no setup lines: srun starts torchrun directly
    assert "--rdzv" not in script and "--container" not in script
    assert written(tmp_path) == []


def test_launch_yaml_with_a_slurm_section(tmp_path, state_dir):
    job = tmp_path / "job.yaml"
    job.write_text(f"""\
recipe: finetune
model:
  path: {REPO / 'automodel_cli' / 'assets' / 'demo'}
  from_scratch: true
data:
  name: demo
output_dir: {tmp_path / 'run'}
launch:
  launcher: slurm
  nodes: 2
  nproc_per_node: 2
  env:
    NCCL_DEBUG: WARN
  slurm:
    partition: batch
    time: "30"
    max_requeues: 3
""")
    result = cli("launch", str(job), "--dry-run", state=state_dir, cwd=tmp_path)
    assert result.exit_code == 0, result.stderr
    script = script_of(result.stdout)
    assert {"--nodes=2", "--partition=batch", "--time=30"} <= set(sbatch_lines(script))
    assert "--nnodes=2 --rdzv-backend=c10d" in script and "MAX_REQUEUES=3" in script
    assert "export NCCL_DEBUG=WARN" in script
    assert written(tmp_path) == ["job.yaml"]


@pytest.mark.parametrize("args, messages", [
    (["launch.slurm.time=1:2:3:4"], ["launch.slurm.time=1:2:3:4", "must be a Slurm time limit"]),
    (["launch.slurm.time=soon"], ["launch.slurm.time", "must be a Slurm time limit"]),
    (["launch.slurm.cpus_per_task=-4"], ["`launch.slurm.cpus_per_task` must be >= 1 (or null), got -4"]),
    (["launch.slurm.mem=lots"], ["launch.slurm.mem", "memory size", "'lots'"]),
    (["launch.slurm.mem=12GB"], ["launch.slurm.mem", "memory size"]),
    (["launch.slurm.time=10", "launch.slurm.signal_grace=900"], ["signal_grace", "shorter than the time limit"]),
    (["launch.slurm.partiton=gpu"], ["unknown option `launch.slurm.partiton`", "Did you mean `launch.slurm.partition`?"]),
    (["launch.slurm.exclusive=maybe"], ["launch.slurm.exclusive", "true or false"]),
    (["launch.slurm.extra_sbatch=[constraint=a100]"], ["extra_sbatch", "--constraint=a100"]),
    (["launch.slurm.container_mounts=[/a:/a]"], ["container_mounts", "needs `launch.slurm.container_image`"]),
    (["launch.slurm.time=soon", "launch.slurm.mem=-1"], ["2 problems", "launch.slurm.time", "mem"]),
    (["launch.slurm.cpus_per_task=0", "launch.slurm.max_requeues=-1"], ["2 problems", "cpus_per_task", "max_requeues"]),
])
def test_bad_slurm_options_are_clear_errors_before_anything_is_written(tmp_path, state_dir, args, messages):
    result = cli("finetune", "demo", *SLURM_FLAGS, "-o", str(tmp_path / "run"), *args,
                 state=state_dir, cwd=tmp_path)
    assert result.exit_code == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    for message in messages:
        assert message in result.stderr
    assert written(tmp_path) == []


def test_missing_sbatch_is_a_clear_error(tmp_path, state_dir):
    empty = tmp_path / "bin"
    empty.mkdir()
    result = cli("finetune", "demo", *SLURM_FLAGS, "-o", str(tmp_path / "run"), state=state_dir, cwd=tmp_path,
                 env={"PATH": str(empty)})
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr
    assert "needs `sbatch`, which is not on PATH" in result.stderr and "--dry-run" in result.stderr
    assert written(tmp_path) == ["bin"]


def test_every_slurm_option_is_documented():
    from automodel_cli.components.launch.slurm import OPTIONS

    docs = (REPO / "docs" / "launch.md").read_text()
    section = docs.split("<!-- slurm: maintained by the Slurm launcher -->", 1)[1].split("<!-- k8s:", 1)[0]
    for name, key in OPTIONS.items():
        assert f"| `{name}` |" in section and key.doc in section, f"docs/launch.md: launch.slurm.{name}"


def test_status_of_an_unknown_job_is_a_clear_error(tmp_path, state_dir):
    result = cli("launch", "status", "4242", state=state_dir, cwd=tmp_path)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert "No job `4242` is known here" in result.stderr


# ------------------------------------------------------------------------- real cluster
@pytest.fixture(scope="module")
def cluster():
    reason = slurm_cluster.skip_reason()
    if reason:
        if slurm_cluster.required():
            pytest.fail(f"{slurm_cluster.REQUIRE_ENV}=1 but {reason}")
        pytest.skip(reason)
    started = slurm_cluster.SlurmCluster.start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """Working directory and job index shared by the cluster tests (`launch list` sees them all)."""
    return tmp_path_factory.mktemp("slurm-jobs")


def submit(cluster, home: Path, run: Path, *args: str, env: dict[str, str] | None = None):
    return cli("finetune", "demo", *SLURM_FLAGS, "-o", str(run), *SMALL, *args,
               state=home / "state", cwd=home, env={**cluster.env, **(env or {})})


def job_id_of(result) -> str:
    assert result.exit_code == 0, result.stdout + result.stderr
    match = re.search(r"^submitted slurm job (\d+) ", result.stdout, re.M)
    assert match, result.stdout
    return match.group(1)


def follow(cluster, home: Path, job_id: str, timeout: float = 240):
    """`automodel launch logs ID --follow`: returns once the job has left the queue."""
    result = cli("launch", "logs", job_id, "--follow", state=home / "state", cwd=home, env=cluster.env,
                 timeout=timeout)
    assert result.exit_code == 0, result.stderr + cluster.daemon_logs()
    return result


def wait_for(predicate, timeout: float, what: str, cluster, run: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    logs = "".join(f"--- {p}\n{p.read_text()[-6000:]}\n" for p in (run / "launch").glob("slurm-*.out")) if run else ""
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}{cluster.daemon_logs()}")


def steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


#: A credential exported in the submitting shell and handed to the job by reference.
TOKEN = "hf_" + "SlurmJobTokenValue0123456789abcdef"


@pytest.fixture(scope="module")
def finished(cluster, home):
    """A 2-process LoRA-free fine-tune submitted through sbatch and followed to its end; its
    HF_TOKEN comes from the submitting shell by reference (launch.env), and each node's setup
    prints a hash of what it received."""
    run = home / "finished"
    result = submit(cluster, home, run, "train.max_steps=6", "checkpoint.every_steps=3",
                    "launch.env.HF_TOKEN=${AUTOMODEL_TEST_TOKEN}",
                    "launch.setup=['echo setup ran on $(hostname) for job $SLURM_JOB_ID',"
                    " 'echo token-hash=$(printf %s \"$HF_TOKEN\" | sha256sum | cut -c1-16)']",
                    env={"AUTOMODEL_TEST_TOKEN": TOKEN})
    job_id = job_id_of(result)
    logs = follow(cluster, home, job_id)
    return {"run": run, "job_id": job_id, "submit": result, "logs": logs.stdout}


def test_a_token_passed_by_reference_reaches_the_nodes_and_is_written_nowhere(finished, home):
    import hashlib

    assert f"token-hash={hashlib.sha256(TOKEN.encode()).hexdigest()[:16]}" in finished["logs"]
    launch = finished["run"] / "launch"
    assert 'export HF_TOKEN="${AUTOMODEL_TEST_TOKEN}"' in (launch / "job.sbatch").read_text()
    assert "HF_TOKEN: ${AUTOMODEL_TEST_TOKEN}" in (launch / "config.yaml").read_text()
    written = [p for p in home.rglob("*") if p.is_file()]
    assert launch / "job.json" in written and any(p.name.startswith("slurm-") for p in written)
    assert [p for p in written if TOKEN.encode() in p.read_bytes()] == []
    assert TOKEN not in finished["submit"].stdout + finished["submit"].stderr + finished["logs"]


def test_submitted_job_trains_and_writes_a_loadable_model(finished, cluster):
    import torch
    from transformers import AutoModelForCausalLM

    run, job_id = finished["run"], finished["job_id"]
    out = finished["submit"].stdout
    assert f"job directory: {run}" in out
    for command in ("logs", "status", "cancel"):
        assert f"automodel launch {command} {job_id}" in out
    record = json.loads((run / "launch" / "job.json").read_text())
    assert record["launcher"] == "slurm" and record["job_id"] == job_id
    assert (run / "launch" / "job.sbatch").is_file() and (run / "launch" / "config.yaml").is_file()
    assert "resume: auto" in (run / "launch" / "config.yaml").read_text()
    assert steps(run) == [1, 2, 3, 4, 5, 6]
    assert (run / "checkpoints" / "step_00000006" / "meta.json").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 6, 7]])).logits
    assert torch.isfinite(logits).all()
    logs = finished["logs"]
    assert f"job {job_id} (restart 0)" in logs
    assert f"setup ran on {cluster.node} for job {job_id}" in logs
    assert "2 data-parallel rank(s)" in logs
    assert f"saved {run}/final" in logs and "training finished" in logs
    assert f"job {job_id} is no longer in the queue: finished" in logs


def test_status_logs_and_list_of_a_finished_job(finished, cluster, home):
    run, job_id = finished["run"], finished["job_id"]
    status = cli("launch", "status", job_id, state=home / "state", cwd=home, env=cluster.env)
    assert status.exit_code == 0, status.stderr
    assert f"slurm job {job_id} (finetune) in {run}" in status.stdout
    assert re.search(r"state: (COMPLETED|not in Slurm's queue any more; from the job directory: finished)",
                     status.stdout), status.stdout
    assert "progress: step 6" in status.stdout and f"final output: {run}/final" in status.stdout
    logs = cli("launch", "logs", str(run), state=home / "state", cwd=home, env=cluster.env)
    assert logs.exit_code == 0 and f"saved {run}/final" in logs.stdout
    listed = cli("launch", "list", state=home / "state", cwd=home, env=cluster.env)
    assert listed.exit_code == 0
    assert re.search(rf"slurm\s+{job_id}\s+{re.escape(str(run))}", listed.stdout), listed.stdout


def test_warning_signal_checkpoints_requeues_and_resumes(cluster, home):
    run = home / "requeued"
    total = 200
    job_id = job_id_of(submit(cluster, home, run, f"train.max_steps={total}", "checkpoint.every_steps=1000"))
    wait_for(lambda: (run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3,
             120, "training to start", cluster, run)
    # What Slurm sends signal_grace seconds before the time limit: USR1 to the batch shell.
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    wait_for(lambda: cluster.job(job_id).get("Restarts") == "1", 90, "the job to requeue itself", cluster, run)
    logs = follow(cluster, home, job_id).stdout
    stopped = re.search(rf"stopped at step (\d+)/{total}; a checkpoint was saved", logs)
    assert stopped, logs[-4000:]
    step = int(stopped.group(1))
    assert 3 <= step < total
    assert "received SIGUSR1: asking the ranks to save a checkpoint and stop" in logs
    assert f"requeuing job {job_id} (restart 1 of at most 20); it resumes from step_{step:08d}" in logs
    assert f"job {job_id} (restart 1)" in logs and f"latest checkpoint: step_{step:08d}" in logs
    assert re.search(rf"resumed from \S+/checkpoints/step_{step:08d} at step {step}\b", logs), logs[-4000:]
    assert logs.index("requeuing job") < logs.index("resumed from") < logs.index("training finished")
    assert steps(run) == list(range(1, total + 1))  # continued, not restarted
    assert (run / "final" / "config.json").is_file() and (run / "summary.json").is_file()
    assert (run / "checkpoints" / f"step_{step:08d}" / "meta.json").is_file()


def test_a_user_error_in_a_rank_is_shown_by_status_and_logs(cluster, home):
    # A missing file is refused at submission; a file that exists but is broken is found by the ranks.
    run = home / "bad-data"
    broken = home / "broken.jsonl"
    broken.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n')
    job_id = job_id_of(submit(cluster, home, run, "data.name=auto", f"data.path={broken}", "train.max_steps=2"))
    logs = follow(cluster, home, job_id).stdout
    error = f"{broken} line 2: not valid JSON"
    assert error in logs, logs[-4000:]
    assert "training exited with status" in logs and "requeuing" not in logs
    assert f"is no longer in the queue: failed: {error}" in logs
    status = cli("launch", "status", job_id, state=home / "state", cwd=home, env=cluster.env)
    assert status.exit_code == 0, status.stderr
    assert "error reported by a rank: " in status.stdout and error in status.stdout
    assert re.search(r"state: (FAILED|not in Slurm's queue any more; from the job directory: failed)", status.stdout)
    assert not (run / "final").exists()


def test_cancel_a_job(cluster, home):
    run = home / "cancelled"
    job_id = job_id_of(submit(cluster, home, run, "train.max_steps=100000"))
    status = cli("launch", "status", job_id, state=home / "state", cwd=home, env=cluster.env)
    assert status.exit_code == 0 and re.search(r"state: (PENDING|RUNNING|CONFIGURING)", status.stdout), status.stdout
    result = cli("launch", "cancel", job_id, state=home / "state", cwd=home, env=cluster.env)
    assert result.exit_code == 0, result.stderr
    assert f"cancelled slurm job {job_id}" in result.stdout
    wait_for(lambda: job_id not in cluster.queue(), 60, "the cancelled job to leave the queue", cluster)
    again = cli("launch", "cancel", job_id, state=home / "state", cwd=home, env=cluster.env)
    assert again.exit_code == 2 and "Traceback" not in again.stderr
    assert f"Slurm job {job_id} is not pending or running" in again.stderr
    # The frozen config names its recipe, job directory and launcher: it submits the job again.
    resubmit = cli("launch", str(run / "launch" / "config.yaml"), "--dry-run", state=home / "state", cwd=home,
                   env=cluster.env)
    assert resubmit.exit_code == 0, resubmit.stderr
    assert f"--output={run}/launch/slurm-%j.out" in script_of(resubmit.stdout)


def test_rejected_submission_shows_slurms_message(cluster, home):
    run = home / "rejected"
    result = submit(cluster, home, run, "launch.slurm.partition=nosuchpartition")
    assert result.exit_code == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "Submitting the Slurm job (sbatch) failed" in result.stderr
    assert "Invalid partition name specified" in result.stderr
    assert not run.exists()  # nothing half-made is left behind
