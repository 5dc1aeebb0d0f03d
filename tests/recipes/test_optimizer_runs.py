"""Every built-in optimizer checkpoints and resumes exactly: a run resumed from its step-2
checkpoint repeats steps 3-4 bit for bit (step 4's loss and the final weights depend on the
restored optimizer state); SGD's momentum saved by two processes resumes on one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tree_digest

RUN = ["finetune", "demo", "train.max_steps=4", "train.global_batch_size=16", "train.micro_batch_size=16",
       "data.eval_split=null", "train.eval_every_steps=null", "logging.progress=false", "checkpoint.every_steps=2"]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor", "muon", "adamw8bit"])
def test_resume_repeats_the_steps_exactly(cli, tmp_path, name):
    if name == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    run = tmp_path / name
    first = cli(*RUN, f"optim.name={name}", "-o", str(run))
    assert first.exit_code == 0, first.stderr
    uninterrupted, weights = losses(run), tree_digest(run / "final")
    resumed = cli(*RUN, f"optim.name={name}", "-o", str(run),
                  f"checkpoint.resume={run / 'checkpoints' / 'step_00000002'}")
    assert resumed.exit_code == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert losses(run) == uninterrupted and len(uninterrupted) == 4
    assert tree_digest(run / "final") == weights


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
def test_sgd_momentum_saved_by_two_processes_resumes_on_one(tmp_path):
    from test_finetune_distributed import finetune, losses as run_losses

    reference, run = tmp_path / "one", tmp_path / "reshard"
    assert finetune(reference, "optim.name=sgd", "train.max_steps=6").returncode == 0
    first = finetune(run, "--nproc-per-node", "2", "optim.name=sgd", "checkpoint.every_steps=3", "train.max_steps=3")
    assert first.returncode == 0, first.stderr[-4000:]
    resumed = finetune(run, "optim.name=sgd", "checkpoint.resume=auto", "train.max_steps=6")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout
    # Two processes sum the gradients in another order: float32 rounding, as in the other reshard tests.
    assert run_losses(run) == pytest.approx(run_losses(reference), abs=1e-4)
