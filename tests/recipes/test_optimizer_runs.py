"""Every built-in optimizer checkpoints and resumes exactly: a 10-step run killed with SIGKILL
after step 5 and resumed from its last checkpoint repeats the uninterrupted run's losses and
final weights bit for bit (the steps after the checkpoint depend on the restored optimizer
state); the state saved by two processes (FSDP2, sharded parameters) resumes on one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tree_digest

RUN = ["finetune", "demo", "train.max_steps=4", "train.global_batch_size=16", "train.micro_batch_size=16",
       "data.eval_split=null", "train.eval_every_steps=null", "logging.progress=false", "checkpoint.every_steps=2"]
OPTIMIZERS = ["adamw", "sgd", "adafactor", "muon", "adamw8bit"]
#: adamw8bit keeps its state per process-local tensor: one process only.
SHARDABLE = [name for name in OPTIMIZERS if name != "adamw8bit"]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def killable(run: Path, name: str, *extra: str) -> subprocess.Popen:
    from test_finetune_resume import ENV

    args = [*RUN, "train.max_steps=10", f"optim.name={name}", "-o", str(run), *extra]
    return subprocess.Popen([sys.executable, "-m", "automodel_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


@pytest.mark.slow
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_sigkill_then_resume_repeats_the_steps_exactly(tmp_path, name):
    from test_finetune_resume import kill_then_resume

    if name == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    reference, run = tmp_path / "reference", tmp_path / "killed"
    whole = killable(reference, name)
    assert whole.wait(timeout=600) == 0, whole.stderr.read()
    kill_then_resume(lambda path, *extra: killable(path, name, *extra), run, 5)
    assert losses(run) == losses(reference) and len(losses(run)) == 10
    assert tree_digest(run / "final") == tree_digest(reference / "final")


def test_changing_the_optimizer_on_resume_is_refused(cli, tmp_path):
    run = tmp_path / "run"
    assert cli(*RUN, "-o", str(run), "train.max_steps=2").exit_code == 0
    before = tree_digest(run)
    result = cli(*RUN, "-o", str(run), "optim.name=sgd", "checkpoint.resume=auto")
    assert result.exit_code == 2 and "optim.name: saved 'adamw', now 'sgd'" in result.stderr
    assert tree_digest(run) == before


def test_changed_optimizer_options_need_allow_changes_and_are_applied(cli, tmp_path):
    run = tmp_path / "run"
    assert cli(*RUN, "-o", str(run), "optim.name=sgd", "train.max_steps=2").exit_code == 0
    refused = cli(*RUN, "-o", str(run), "optim.name=sgd", "optim.sgd.momentum=0.5", "checkpoint.resume=auto")
    assert refused.exit_code == 2 and "optim.sgd.momentum: saved 0.9, now 0.5" in refused.stderr
    allowed = cli(*RUN, "-o", str(run), "optim.name=sgd", "optim.sgd.momentum=0.5", "checkpoint.resume=auto",
                  "checkpoint.allow_changes=true")
    assert allowed.exit_code == 0, allowed.stderr
    assert "changed on resume: optim.sgd.momentum: 0.9 -> 0.5" in allowed.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", SHARDABLE)
def test_state_saved_by_two_processes_resumes_on_one(tmp_path, name):
    """Steps 1-3 on two processes (sharded parameters and optimizer state), 4-6 on one, equal
    six steps on one process."""
    from test_finetune_distributed import finetune, losses as run_losses

    reference, run = tmp_path / "one", tmp_path / "reshard"
    assert finetune(reference, f"optim.name={name}", "train.max_steps=6").returncode == 0
    first = finetune(run, "--nproc-per-node", "2", f"optim.name={name}", "checkpoint.every_steps=3",
                     "train.max_steps=3")
    assert first.returncode == 0, first.stderr[-4000:]
    resumed = finetune(run, f"optim.name={name}", "checkpoint.resume=auto", "train.max_steps=6")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout
    # Two processes sum the gradients in another order: float32 rounding, as in the other reshard tests.
    assert run_losses(run) == pytest.approx(run_losses(reference), abs=1e-4)
