"""Context parallelism in real runs (`automodel finetune|pretrain --nproc-per-node N distributed.cp=2`,
torchrun, gloo on CPU) on the demo model.

One module-scoped set of runs, to pay each torchrun start once: cp=2 on 2 processes and cp=2 x
dp_shard=2 on 4, unpacked and packed, cp=2 x tp=2 with sequence parallelism and LoRA with cp=2 log
the single process's loss, grad norm and validation loss step by step;
pretrain with cp=2 logs the single process's curve and validation (run on whole blocks). cp values
that cannot work stop before torchrun with exit code 2 and one message.
"""

from __future__ import annotations

import pytest

from conftest import one_line, run_cli
from parallel_runs import COMMON, ENV, assert_same_curve, curve, train_groups

pytestmark = pytest.mark.slow

STEPS = 5
#: Relative: five optimizer steps feed each step's rounding differences (cp ranks sum their parts
#: of the loss and gradients in another order than one process) into the next; a token trained
#: twice or never, a target shifted twice or a mask that leaks across a document changes the loss
#: far more than 1e-4 of its value.
TOL = 1e-4

RUNS = {
    "finetune": {"single": (), "cp2": ("--nproc-per-node", "2", "distributed.cp=2"),
                 "cp2x2": ("--nproc-per-node", "4", "distributed.cp=2"),
                 "cp2tp2": ("--nproc-per-node", "4", "distributed.cp=2", "distributed.tp=2",
                            "distributed.sequence_parallel=true")},
    "finetune-lora": {"single": ("--peft", "lora"), "cp2": ("--nproc-per-node", "2", "distributed.cp=2", "--peft", "lora")},
    "finetune-packed": {"single": ("data.packing=true",),
                        "cp2": ("--nproc-per-node", "2", "distributed.cp=2", "data.packing=true"),
                        "cp2x2": ("--nproc-per-node", "4", "distributed.cp=2", "data.packing=true")},
    "pretrain": {"single": ("train.eval_every_steps=2",),
                 "cp2": ("--nproc-per-node", "2", "distributed.cp=2", "train.eval_every_steps=2")},
}

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return train_groups(tmp_path_factory.mktemp("cp"), RUNS)

@pytest.mark.parametrize("group", list(RUNS))
def test_cp_runs_log_the_single_process_metrics(runs, group):
    single = curve(runs[group, "single"][0])
    assert len(single) == STEPS
    for name in RUNS[group]:
        if name == "single":
            continue
        path, result = runs[group, name]
        assert "cp=2" in result.stdout
        assert_same_curve(curve(path), single, f"{group}-{name}", TOL)

def test_cp_with_dp_shard_reads_half_the_samples_per_rank(runs):
    assert "dp_shard=2 x cp=2" in runs["finetune", "cp2x2"][1].stdout
    assert "on each of 2 data-parallel rank(s)" in runs["finetune", "cp2x2"][1].stdout
    assert "eval_loss" in curve(runs["pretrain", "cp2"][0])[1]  # validated at step 2, on whole blocks
    assert "eval_loss" in curve(runs["finetune", "cp2"][0])[-1]  # and finetune after the last step

@pytest.mark.parametrize("args, message", [
    (("--nproc-per-node", "2", "distributed.cp=3"), "1 x 3 x 1 = 3 does not divide 2"),
    (("--nproc-per-node", "4", "distributed.cp=2", "distributed.dp_shard=4"), "multiply to 8 processes"),
    (("--nproc-per-node", "2", "distributed.cp=2", "data.packing=true", "data.max_length=62"),
     "data.max_length=62 (packed rows (data.packing=true)) is not a multiple of 4"),
    (("--nproc-per-node", "2", "distributed.cp=2", "model.config.attn_logit_softcapping=30.0"),
     "attention logit soft-capping"),
])
def test_bad_cp_is_refused_before_launch(tmp_path, args, message):
    result = run_cli("finetune", "demo", "-o", str(tmp_path / "run"), *COMMON, *args, env=ENV, timeout=600)
    assert result.exit_code == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert message in one_line(result.stderr)
    assert result.stderr.strip().splitlines()[0].startswith("error: ")
    assert "Traceback" not in result.stderr and "torchrun" not in result.stderr
    assert not (tmp_path / "run").exists()
