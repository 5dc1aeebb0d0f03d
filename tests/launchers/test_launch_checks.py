"""What every launcher checks before it writes, prints or submits a job.

Credentials (one rule for local, Slurm, Kubernetes and plugin launchers), a cluster job without
GPUs, a job without data or with a local path that is not there, and the mesh the dry run
prints. Everything runs offline through ``--dry-run`` or a refused submission: no cluster is
needed, and a refusal must leave no job directory and no job record behind.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_cli

DEMO = REPO / "automodel_cli" / "assets" / "demo"
SLURM = ["--launcher", "slurm", "--nodes", "2", "--nproc-per-node", "2"]
K8S = ["--launcher", "k8s", "launch.k8s.image=ghcr.io/acme/trainer:1"]
HF_TOKEN = "hf_" + "Q7xLmR2vT9pK4sW8yB3nC6dF1gH5jZ0aE2"  # the shape of a Hugging Face token
SCRIPT_MARKER = "what would be submitted (nothing was) ----\n"


@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch):
    """Run in a temp dir with a private job index, so nothing lands anywhere else."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOMODEL_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def refused(result, *phrases: str, secret: str | None = None) -> None:
    """Exit code 2, one clean message with ``phrases``, no traceback, nothing written."""
    assert result.exit_code == 2, result.stdout[-2000:] + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr
    if secret:
        assert secret not in result.stdout + result.stderr
    assert files_under(Path.cwd()) == [], "a refused command wrote files"


# ------------------------------------------------------------------------------ credentials
@pytest.mark.parametrize("launcher, hint", [
    (["--nproc-per-node", "2"], "Export HF_TOKEN in this shell"),
    ([], "Export HF_TOKEN in this shell"),  # one local process: the same rule, so one YAML runs anywhere
    (SLURM, "Export HF_TOKEN in the shell you submit from"),
    (K8S, "launch.k8s.env_from_secrets"),
    (["--launcher", "background", "--nproc-per-node", "2"], "not in the config"),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_a_token_in_launch_env_is_refused_by_every_launcher(cli, automodel_plugin, launcher, hint, dry_run):
    from test_launch_core import PLUGIN

    automodel_plugin(PLUGIN)
    result = cli("finetune", "demo", *launcher, *(["--dry-run"] if dry_run else []), "-o", "runs/job",
                 f"launch.env.HF_TOKEN={HF_TOKEN}")
    refused(result, "`launch.env.HF_TOKEN` (command line `launch.env.HF_TOKEN=<redacted>`) holds a credential",
            "looks like a Hugging Face token", "docs/launch.md (section Secrets)", hint, secret=HF_TOKEN)


@pytest.mark.parametrize("setting, why", [
    ("launch.env.WANDB_API_KEY=abc123", "its name marks a credential"),
    ("launch.env.DB_PASSWORD=hunter2", "its name marks a credential"),
    ("launch.env.AWS_SECRET_ACCESS_KEY=abc/def+ghi", "its name marks a credential"),
    ("launch.env.MY_VAR=sk-proj-abcdefghijklmnopqrstuvwx", "looks like an API key"),
    ("launch.env.GH=ghp_abcdefghijklmnopqrstuvwxyz0123456789", "looks like a GitHub token"),
    ("launch.env.KEY_ID=AKIAIOSFODNN7EXAMPLE", "looks like an AWS access key id"),
    ("launch.env.WANDB_KEY=0123456789abcdef0123456789abcdef01234567", "looks like a Weights & Biases API key"),
    ("launch.setup=['export HF_TOKEN=abc123']", "the line sets HF_TOKEN to a literal value"),
    (f"launch.setup=['huggingface-cli login --token {HF_TOKEN}']", "the line contains a Hugging Face token"),
    ("data.options.api_key=abc123", "its key marks a credential"),  # the ranks would read <redacted>
    ("data.options.token=abc123", "its key marks a credential"),
])
def test_credentials_by_name_or_shape_are_refused_without_showing_them(cli, setting, why):
    secret = re.split(r"[= ]", setting.rstrip("']"))[-1]
    result = cli("finetune", "demo", *SLURM, "--dry-run", setting)
    refused(result, "holds a credential", why, secret=secret)


def test_several_credentials_are_reported_at_once(cli):
    result = cli("finetune", "demo", *SLURM, "--dry-run", f"launch.env.A={HF_TOKEN}", "launch.env.HF_TOKEN=xyz789",
                 "data.options.api_key=abc123")
    refused(result, "3 settings hold credentials:", "`launch.env.A`", "`launch.env.HF_TOKEN`",
            "`data.options.api_key`", secret=HF_TOKEN)
    assert "xyz789" not in result.stderr and "abc123" not in result.stderr


@pytest.mark.parametrize("setting", [
    "launch.env.TOKENIZERS_PARALLELISM=false",  # names that only contain the letters of one
    "launch.env.GIT_COMMIT=0123456789abcdef0123456789abcdef01234567",  # 40 hex digits, not a W&B variable
    "launch.env.HF_TOKEN=",  # empty: nothing secret
    "model.tokenizer=" + str(DEMO),
    "launch.setup=['export HF_TOKEN=$(cat /shared/secrets/hf_token)']",  # read on the node
])
def test_things_that_only_look_like_credentials_pass(cli, setting):
    result = cli("finetune", "demo", *SLURM, "--dry-run", setting)
    assert result.exit_code == 0, result.stderr


def test_a_literal_in_the_config_is_fine_for_one_local_process(cli):
    """The process reads the config it was given, not a frozen copy: nothing is written for it."""
    assert cli("finetune", "demo", "--dry-run", "data.options.api_key=abc123").exit_code == 0
    refused(cli("finetune", "demo", "--nproc-per-node", "2", "--dry-run", "data.options.api_key=abc123"),
            "`data.options.api_key`", "Libraries read credentials from the environment", "WANDB_API_KEY")


def test_a_reference_is_expanded_by_the_slurm_batch_shell(cli):
    result = cli("finetune", "demo", *SLURM, "--dry-run", "launch.env.HF_TOKEN=${HF_TOKEN}",
                 "launch.env.WANDB_API_KEY=$TEAM_WANDB_KEY", "launch.env.LIBS=/opt/x:${LD_LIBRARY_PATH}",
                 "launch.env.PRICE=5$$ `date` \"q\"")
    assert result.exit_code == 0, result.stderr
    script = result.stdout.split(SCRIPT_MARKER, 1)[1]
    exports = [line for line in script.splitlines()
               if line.startswith("export ") and "LAUNCH_DIR" not in line]
    assert 'export HF_TOKEN="${HF_TOKEN}"' in exports and 'export WANDB_API_KEY="${TEAM_WANDB_KEY}"' in exports
    # bash, as the batch shell runs them (set -u: an unset reference stops the job)
    shell = "set -euo pipefail\n" + "\n".join(exports) + '\nprintf "%s|%s|%s|%s" "$HF_TOKEN" "$WANDB_API_KEY" "$LIBS" "$PRICE"'
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True,
                          env={"HF_TOKEN": "tok-1", "TEAM_WANDB_KEY": "key-2", "LD_LIBRARY_PATH": "/lib"})
    assert done.stdout == 'tok-1|key-2|/opt/x:/lib|5$ `date` "q"', done.stderr
    unset = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, env={})
    assert unset.returncode != 0 and "unbound variable" in unset.stderr
    # a reference to a variable this shell lacks gets a warning (the job would stop on it)
    assert "launch.env.WANDB_API_KEY refers to $TEAM_WANDB_KEY, which is not set in this shell" in result.stderr


def test_the_frozen_config_keeps_references_and_holds_no_secret(cli, workdir, monkeypatch):
    """Submitting writes the job directory; the frozen config resubmits the same job."""
    from automodel_cli.components.launch.start import build_spec, make_launcher
    from automodel_cli.config.assemble import resolve_command
    from automodel_cli.plugin_host import get_host

    registries = get_host().registries
    entry = registries.recipes.get("finetune")
    cfg = resolve_command(registries, recipe=entry, target="demo", config_files=[], flags={},
                          overrides=["launch.launcher=slurm", "launch.env.HF_TOKEN=${HF_TOKEN}",
                                     "launch.env.NCCL_DEBUG=WARN", f"output_dir={workdir / 'run'}"])
    spec = build_spec(entry, cfg, make_launcher(registries, "slurm"), registries)
    spec.prepare_job_dir()
    frozen = spec.freeze()
    text = frozen.read_text()
    assert "HF_TOKEN: ${HF_TOKEN}" in text and "NCCL_DEBUG: WARN" in text and "<redacted>" not in text
    again = cli("launch", str(frozen), "--dry-run")
    assert again.exit_code == 0, again.stderr
    assert 'export HF_TOKEN="${HF_TOKEN}"' in again.stdout


# ----------------------------------------------------------------------------------- GPUs
def test_a_gpu_sized_model_without_gpus_is_refused_on_cluster_launchers(cli):
    for launcher in (["--launcher", "slurm"], K8S):
        result = cli("finetune", "llama3", *launcher, "--nodes", "4", "--dry-run", "data.path=acme/sft-mix",
                     *(["launch.k8s.pvc=runs"] if "k8s" in launcher else []))
        refused(result, "--gpus-per-node is not set", "request no GPUs",
                "meta-llama/Llama-3.2-1B-Instruct (1,236M parameters)", "--gpus-per-node 0",
                "command line `--launcher`")
    # a hub model without a bundled config: its size is unknown here, taken to be GPU-sized
    refused(cli("finetune", "--launcher", "slurm", "--dry-run", "model.path=acme/new-model", "data.path=acme/d"),
            "acme/new-model (its size is not known here")
    # a small architecture grown by model.config overrides counts with its new size
    refused(cli("finetune", "demo", *SLURM, "--dry-run", "model.config.hidden_size=2048",
                "model.config.intermediate_size=8192", "model.config.num_hidden_layers=8"), "M parameters)")


def test_gpus_on_purpose_or_a_small_model(cli):
    zero = cli("finetune", "llama3", "--launcher", "slurm", "--dry-run", "data.path=acme/sft-mix",
               "launch.gpus_per_node=0", "launch.nproc_per_node=4")
    assert zero.exit_code == 0, zero.stderr
    assert "gpus-per-node" not in zero.stderr and "--gpus-per-node" not in zero.stdout.split(SCRIPT_MARKER)[1]
    small = cli("finetune", "demo", *SLURM, "--dry-run")
    assert small.exit_code == 0, small.stderr
    warnings = [line for line in small.stderr.splitlines() if "--gpus-per-node" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: --gpus-per-node is not set")
    gpus = cli("finetune", "llama3", "--launcher", "slurm", "--gpus-per-node", "8", "--dry-run", "data.path=acme/d")
    assert gpus.exit_code == 0 and "gpus-per-node is not set" not in gpus.stderr


# ---------------------------------------------------------------------------- data, paths
def test_every_problem_the_submitting_machine_can_see_is_reported_at_once(cli, workdir):
    result = cli("distill", "--launcher", "slurm", "--gpus-per-node", "8", "--dry-run", "-o", "runs/job",
                 f"model.path={workdir / 'no-model'}", "model.tokenizer=./no-tokenizer", "data.eval_path=acme/eval")
    refused(result, "The configuration has 4 problems",
            "command line `model.path=", f"`model.path` is the local path `{workdir / 'no-model'}`, which does not exist",
            "command line `model.tokenizer=./no-tokenizer`", "`model.tokenizer` is the local path `./no-tokenizer`",
            "distill.teacher_path is not set", "no training data: data.path is not set")
    assert "acme/eval" not in result.stderr  # a hub id is the cluster's business


@pytest.mark.parametrize("args", [
    ["finetune", "demo"],  # data.name=demo brings its own data
    ["pretrain", "demo"],
    ["finetune", f"model.path={DEMO}", "model.from_scratch=true", "data.name=squad"],  # a hub default
    ["finetune", "demo", "data.name=auto", "data.path=acme/sft-mix"],  # a hub id: not checked here
    ["benchmark", "demo", "data.name=auto"],  # synthetic tokens: no data at all
])
def test_jobs_with_data_pass(cli, args):
    result = cli(*args, *SLURM, "--dry-run")
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("args, phrase", [
    (["finetune", "demo", "data.name=auto"], "no training data: data.path is not set (data.name=auto"),
    (["pretrain", "demo", "data.name=auto"], "no training data"),
    (["benchmark", "demo", "data.name=auto", "benchmark.synthetic=false"], "no training data"),
    (["finetune", "demo", "data.name=auto", "data.path=data/train.jsonl"], "`data.path` is the local path `data/train.jsonl`"),
    (["finetune", "demo", "data.eval_path=/no/such/eval.jsonl"], "`data.eval_path` is the local path"),
    (["distill", "demo", "distill.teacher_path=runs/teacher/final"], "`distill.teacher_path` is the local path"),
])
def test_jobs_that_would_fail_in_the_queue_are_refused(cli, args, phrase):
    refused(cli(*args, *SLURM, "-o", "runs/job"), phrase)
    refused(cli(*args, *SLURM, "--dry-run"), phrase)


def test_local_torchrun_is_checked_before_it_starts(cli):
    refused(cli("finetune", "demo", "--nproc-per-node", "2", "-o", "runs/job", "data.name=auto",
                "data.path=missing.jsonl"), "`data.path` is the local path `missing.jsonl`")


def test_paths_are_checked_where_the_job_reads_them(cli, workdir):
    # launch.setup may create a path on the node (say, unpacking data to local disk)
    staged = ["data.name=auto", "data.path=/tmp/stage/job/train.jsonl",
              "launch.setup=['mkdir -p /tmp/stage/job && tar -xf /shared/d.tar -C /tmp/stage/job']"]
    assert cli("finetune", "demo", *SLURM, "--dry-run", *staged).exit_code == 0
    # ...but mentioning a directory above it (/tmp/stage) is not enough
    refused(cli("finetune", "demo", *SLURM, "--dry-run", "data.name=auto", "data.path=/tmp/stage/job/train.jsonl",
                "launch.setup=['ls /tmp/stage']"), "`data.path` is the local path")
    # in a container, a path under a mount is checked at the mount's source; one in the image is not
    source = workdir / "datasets"
    container = ["launch.slurm.container_image=nvcr.io/nvidia/pytorch:25.01-py3",
                 f"launch.slurm.container_mounts=[{source}:/data]", "data.name=auto"]
    refused(cli("finetune", "demo", *SLURM, "--dry-run", *container, "data.path=/data/train.jsonl"),
            f"`/data/train.jsonl (here: {source}/train.jsonl)`")
    assert cli("finetune", "demo", *SLURM, "--dry-run", *container, "data.path=/opt/image-data/train.jsonl").exit_code == 0
    source.mkdir()
    (source / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    assert cli("finetune", "demo", *SLURM, "--dry-run", *container, "data.path=/data/train.jsonl").exit_code == 0
    # pods read the image and cluster volumes: nothing on this machine is checked
    assert cli("finetune", "demo", *K8S, "--dry-run", "data.name=auto", "data.path=/data/train.jsonl").exit_code == 0


# ------------------------------------------------------------------------------- dry run
@pytest.mark.parametrize("args, line", [
    (["--launcher", "slurm", "--gpus-per-node", "8"], "# mesh: dp_replicate=1 dp_shard=8 tp=1 (world size 8 = 1 node x 8 processes)"),
    (["--launcher", "slurm", "--nodes", "2", "--gpus-per-node", "8", "distributed.tp=2"],
     "# mesh: dp_replicate=1 dp_shard=8 tp=2 (world size 16 = 2 nodes x 8 processes)"),
    ([], "# mesh: dp_replicate=1 dp_shard=1 tp=1 (world size 1 = 1 node x 1 process)"),
])
def test_dry_run_prints_the_resolved_mesh(cli, args, line):
    result = cli("finetune", "demo", *args, "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[1] == line


def test_a_slurm_dry_run_imports_no_torch(workdir):
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "automodel_cli", "finetune", "llama3",
                           "--launcher", "slurm", "--nodes", "2", "--gpus-per-node", "8", "--dry-run",
                           "data.path=acme/sft-mix", f"launch.env.HF_TOKEN=${{HF_TOKEN}}"],
                          capture_output=True, text=True, cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    modules = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    heavy = sorted(m for m in modules if m.split(".")[0] in ("torch", "transformers", "datasets", "numpy"))
    assert heavy == [] and "automodel_cli.components.launch.preflight" in modules


def test_distributed_docs_describe_gpus_per_node_as_a_request():
    text = (REPO / "docs" / "distributed.md").read_text()
    assert "alias `--gpus-per-node`" not in text and "--gpus-per-node" in text


def test_refused_cluster_submission_leaves_an_existing_run_untouched(workdir):
    """Through a real process: a refused resubmission into a run directory changes nothing."""
    run = workdir / "run"
    (run / "launch").mkdir(parents=True)
    (run / "launch" / "config.yaml").write_text("kept\n")
    before = {p: p.read_bytes() for p in files_under(run)}
    result = run_cli("finetune", "demo", *SLURM, "-o", str(run), f"launch.env.HF_TOKEN={HF_TOKEN}", cwd=workdir)
    assert result.exit_code == 2 and HF_TOKEN not in result.stdout + result.stderr
    assert {p: p.read_bytes() for p in files_under(run)} == before
    assert not (workdir / "state").exists()
