"""Pipeline parallelism in real runs (`automodel finetune|pretrain --nproc-per-node N
distributed.pp=2`, torchrun, gloo on CPU) on the demo model.

One module-scoped set of runs, to pay each torchrun start once. These log the single process's
loss, grad norm and validation loss step by step and save its final weights: pp=2 with 1F1B and
GPipe on 2 processes; pp=2 x dp_shard=2 (FSDP inside each stage) and pp=2 x tp=2 on 4;
activation checkpointing and the fused linear_ce loss on the last stage; interleaved 1F1B (2
stages per rank, on the demo deepened to 4 layers); LoRA; pretrain with pp=2. Checkpoints move
between pp sizes (saved with pp=2, resumed with pp=1, and the reverse) and continue the single
process's curve; `checkpoint consolidate` of a pp=2 checkpoint gives the single process's
directory. Settings the pipeline cannot run stop before torchrun with exit code 2 and one message.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import one_line, run_cli
from parallel_runs import COMMON as RUN, ENV, assert_same_curve, curve, train_groups
from parallel_runs import train as train_demo

pytestmark = pytest.mark.slow

STEPS = 5
COMMON = (*RUN, "checkpoint.every_steps=3")
#: Relative: five optimizer steps feed each step's rounding differences (the tied embedding's two
#: copies add their gradients, stages sum the gradient norm in another order than one process)
#: into the next; a micro-batch trained twice or never, a stage that skips a layer or a loss
#: normalised per stage changes the loss far more than 1e-4 of its value.
TOL = 1e-4
PP2 = ("--nproc-per-node", "2", "distributed.pp=2")
DEEP = ("model.config.num_hidden_layers=4",)

RUNS = {
    "finetune": {"single": (), "pp2": PP2, "gpipe": (*PP2, "distributed.pp_schedule=gpipe"),
                 "pp2x2": ("--nproc-per-node", "4", "distributed.pp=2"),
                 "pp2tp2": ("--nproc-per-node", "4", "distributed.pp=2", "distributed.tp=2"),
                 # Recomputed layers and the fused LM head + loss on the last stage change no value.
                 "pp2-ac": (*PP2, "train.activation_checkpointing=full"),
                 "pp2-linear_ce": (*PP2, "loss.name=linear_ce")},
    "finetune-deep": {"single": DEEP, "interleaved": (*PP2, "distributed.pp_schedule=interleaved_1f1b", *DEEP)},
    "finetune-lora": {"single": ("--peft", "lora"), "pp2": (*PP2, "--peft", "lora")},
    "pretrain": {"single": ("train.eval_every_steps=2",), "pp2": (*PP2, "train.eval_every_steps=2")},
}


def train(recipe: str, run: Path, *args: str):
    return train_demo(recipe, run, *args, common=COMMON)


def assert_same_weights(got: Path, expected: Path) -> None:
    """Same tensor names; values within TOL of the largest magnitude of each tensor (five steps
    of training carry the curves' rounding differences into the weights)."""
    mine, theirs = load_file(got), load_file(expected)
    assert sorted(mine) == sorted(theirs)
    for name, value in theirs.items():
        scale = float(value.abs().max()) or 1.0
        assert float((mine[name] - value).abs().max()) <= TOL * scale, name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return train_groups(tmp_path_factory.mktemp("pp"), RUNS, common=COMMON)


@pytest.mark.parametrize("group", list(RUNS))
def test_pipelined_runs_log_the_single_process_metrics(runs, group):
    single = curve(runs[group, "single"][0])
    assert len(single) == STEPS and "eval_loss" in single[-1]
    for name in RUNS[group]:
        if name == "single":
            continue
        path, result = runs[group, name]
        assert "pp=2 x" in result.stdout and "pipeline: " in result.stdout
        assert_same_curve(curve(path), single, f"{group}-{name}", TOL)


def test_the_stages_are_split_and_scheduled_as_configured(runs):
    assert "pipeline: 2 stages on 2 ranks, schedule 1f1b; stage 0: layers 0-0 + embedding (rank 0); " \
           "stage 1: layers 1-1 + norm, head, loss (rank 1)" in runs["finetune", "pp2"][1].stdout
    assert "schedule gpipe" in runs["finetune", "gpipe"][1].stdout
    interleaved = runs["finetune-deep", "interleaved"][1].stdout
    assert "pipeline: 4 stages on 2 ranks, schedule interleaved_1f1b" in interleaved
    assert "stage 2: layers 2-2 (rank 0)" in interleaved and "stage 3: layers 3-3 + norm, head, loss (rank 1)" in interleaved
    both = runs["finetune", "pp2x2"][1].stdout
    assert "pp=2 x dp_replicate=1 x dp_shard=2" in both and "on each of 2 data-parallel rank(s)" in both
    assert "first stage" in runs["finetune", "pp2"][1].stdout  # the memory plan is a stage's


@pytest.mark.parametrize("group, name", [("finetune", "pp2"), ("finetune", "pp2x2"), ("finetune-deep", "interleaved"),
                                         ("pretrain", "pp2")])
def test_the_final_model_gathers_every_stage(runs, group, name):
    assert_same_weights(runs[group, name][0] / "final" / "model.safetensors",
                        runs[group, "single"][0] / "final" / "model.safetensors")


def test_a_pipelined_lora_run_saves_the_whole_adapter(runs):
    assert_same_weights(runs["finetune-lora", "pp2"][0] / "final" / "adapter_model.safetensors",
                        runs["finetune-lora", "single"][0] / "final" / "adapter_model.safetensors")


@pytest.mark.parametrize("first, then", [(PP2, ()), ((), PP2)], ids=["pp2-then-pp1", "pp1-then-pp2"])
def test_a_checkpoint_resumes_with_another_pipeline_size(runs, tmp_path, first, then):
    run = tmp_path / "run"
    train("finetune", run, *first, "train.max_steps=3")
    result = train("finetune", run, *then, "checkpoint.resume=auto")
    assert "resumed from" in result.stdout and "changed on resume: distributed.pp" in result.stdout
    # The first run validated after its last step (3), the single process only after step 5.
    training = [{k: v for k, v in s.items() if k != "eval_loss"} for s in curve(run)]
    single = [{k: v for k, v in s.items() if k != "eval_loss"} for s in curve(runs["finetune", "single"][0])]
    assert_same_curve(training, single, "resumed", TOL)


def test_consolidating_a_pipelined_checkpoint_gives_the_single_process_model(runs, tmp_path):
    outs = {}
    for name in ("single", "pp2"):
        outs[name] = tmp_path / name
        result = run_cli("checkpoint", "consolidate", str(runs["finetune", name][0] / "checkpoints" / "step_00000003"),
                         "-o", str(outs[name]))
        assert result.exit_code == 0, result.stderr[-3000:]
    assert_same_weights(outs["pp2"] / "model.safetensors", outs["single"] / "model.safetensors")
    assert (outs["pp2"] / "config.json").read_text() == (outs["single"] / "config.json").read_text()
    shutil.rmtree(tmp_path)


@pytest.mark.parametrize("recipe, args, message", [
    ("finetune", ("--nproc-per-node", "2", "distributed.pp=3"), "3 does not divide 2"),
    ("finetune", (*PP2, "distributed.pp_schedule=interleaved_1f1b"),
     "4 pipeline stages need at least 4 decoder layers; the model has 2"),
    ("finetune", (*PP2, "distributed.pp_split=[4]", *DEEP), "do not cut layers 0..3 into 2"),
    ("finetune", (*PP2, "distributed.pp_virtual_stages=2"), "needs distributed.pp_schedule=interleaved_1f1b"),
    ("finetune", ("--nproc-per-node", "4", "distributed.pp=2", "distributed.cp=2"), "does not combine with distributed.cp=2"),
    ("distill", (*PP2, "distill.teacher_path=demo"), "supported by finetune and pretrain, not by `automodel distill`"),
])
def test_bad_pipeline_settings_are_refused_before_launch(tmp_path, recipe, args, message):
    result = run_cli(recipe, "demo", "-o", str(tmp_path / "run"), *COMMON, *args, env=ENV, timeout=600)
    assert result.exit_code == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert message in one_line(result.stderr)
    assert result.stderr.strip().splitlines()[0].startswith("error: ")
    assert "Traceback" not in result.stderr and "torchrun" not in result.stderr
    assert not (tmp_path / "run").exists()
