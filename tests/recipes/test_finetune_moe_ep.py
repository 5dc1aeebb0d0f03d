"""Expert parallelism in real runs (`automodel finetune --nproc-per-node N distributed.ep=E`,
torchrun, gloo on CPU) on a tiny Qwen3-MoE loaded from its Hugging Face directory.

One module-scoped set of runs checks several things, to pay each torchrun start once: ep=2 on 2
processes, ep=2 on 4 processes (experts replicated over 2), tp=2 on 2 processes and ep=2 x tp=2 on
4 log the single process's metrics (loss, aux loss, grad norm, ...) step by step; a checkpoint saved with ep=2 resumes with ep=1 on one process and one saved with
ep=1 resumes with ep=2, both continuing the single process's curve; `checkpoint consolidate` of
an ep=2 checkpoint writes the model an ep=1 run's checkpoint gives; and ep values that cannot
work stop with exit code 2 and one message.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from automodel_cli.components.logging import read_metrics
from conftest import one_line, run_cli
from moe_models import save_moe_model

pytestmark = pytest.mark.slow

STEPS = 5
SAVE_AT = 3
COMMON = (f"train.max_steps={STEPS}", "train.global_batch_size=8", "train.micro_batch_size=2",
          "train.eval_every_steps=null", "data.eval_split=null", "logging.progress=false", "model.dtype=float32",
          "model.from_scratch=false", f"checkpoint.every_steps={SAVE_AT}")
ENV = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
#: Relative: five optimizer steps feed each step's rounding differences (ranks sum tokens and
#: gradients in another order than one process) into the next; a wrong shard, a missing replica
#: sum or a dropped token changes the loss far more than 1e-4 of its value.
TOL = 1e-4
#: Metrics that measure the machine, not the training.
TIMING = ("tokens_per_s", "tokens_per_s_per_device", "mfu", "step_seconds")


def finetune(model: Path, run: Path, *args: str):
    result = run_cli("finetune", "demo", f"model.path={model}", "-o", str(run), *COMMON, *args, env=ENV, timeout=600)
    assert result.exit_code == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def curve(run: Path) -> list[dict]:
    """Every metric both kinds of run log (loss, grad_norm, and any loss terms), per step."""
    return [{k: v for k, v in step.items() if k not in TIMING} for step in read_metrics(run / "metrics.jsonl")]


def assert_same_curve(got: list[dict], expected: list[dict]) -> None:
    assert [s["step"] for s in got] == [s["step"] for s in expected]
    for mine, theirs in zip(got, expected):
        assert set(mine) == set(theirs)
        for key, value in theirs.items():
            assert mine[key] == pytest.approx(value, rel=TOL, abs=1e-12), (mine["step"], key)


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory) -> Path:
    return save_moe_model(tmp_path_factory.mktemp("model") / "tiny-qwen3-moe", "qwen3_moe")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, moe_model):
    root = tmp_path_factory.mktemp("moe-ep")
    model = moe_model
    out = {"root": root, "model": model}
    for name, args in {"single": (), "ep2": ("--nproc-per-node", "2", "distributed.ep=2"),
                       "ep2x2": ("--nproc-per-node", "4", "distributed.ep=2"),
                       "tp2": ("--nproc-per-node", "2", "distributed.tp=2"),
                       "ep2tp2": ("--nproc-per-node", "4", "distributed.ep=2", "distributed.tp=2")}.items():
        out[name] = finetune(model, root / name, *args)
    return out


def test_ep_runs_log_the_single_process_metrics(runs):
    single = curve(runs["root"] / "single")
    assert len(single) == STEPS
    assert "experts split ep=2 ways inside dp_shard" in runs["ep2"].stdout
    assert "dp_shard=4" in runs["ep2x2"].stdout
    assert "read shard by shard" in runs["single"].stdout  # each process reads its experts only
    for name in ("ep2", "ep2x2", "tp2", "ep2tp2"):  # tensor parallelism: attention sharded, MoE blocks replicated
        assert_same_curve(curve(runs["root"] / name), single)


def checkpoint(run: Path) -> Path:
    return run / "checkpoints" / f"step_{SAVE_AT:08d}"


def test_a_checkpoint_resumes_across_ep_sizes(runs):
    root, single = runs["root"], curve(runs["root"] / "single")
    finetune(runs["model"], root / "ep2-to-1", f"checkpoint.resume={checkpoint(root / 'ep2')}")
    finetune(runs["model"], root / "ep1-to-2", f"checkpoint.resume={checkpoint(root / 'single')}",
             "--nproc-per-node", "2", "distributed.ep=2")
    for name in ("ep2-to-1", "ep1-to-2"):
        assert_same_curve(curve(root / name), single[SAVE_AT:])


def test_consolidating_an_ep_checkpoint_gives_the_ep1_model(runs):
    import torch
    from transformers import AutoModelForCausalLM

    root = runs["root"]
    models = {}
    for name in ("single", "ep2"):
        result = run_cli("checkpoint", "consolidate", str(checkpoint(root / name)), "-o", str(root / f"hf-{name}"))
        assert result.exit_code == 0, result.stderr
        models[name] = dict(AutoModelForCausalLM.from_pretrained(root / f"hf-{name}").named_parameters())
    assert any("experts" in name for name in models["single"])
    assert models["ep2"].keys() == models["single"].keys()
    for name, expected in models["single"].items():
        # three Adam steps from equal weights: updates of lr size, rounding far below 1e-6 of them
        torch.testing.assert_close(models["ep2"][name], expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("args, model, message", [
    (("--nproc-per-node", "2", "distributed.ep=4"), "moe",
     "distributed.ep=4 must be a positive integer dividing dp_shard=2"),
    (("--nproc-per-node", "2", "distributed.ep=2"), "dense", "has no experts"),
])
def test_bad_ep_is_refused(moe_model, tmp_path, args, model, message):
    model_args = (f"model.path={moe_model}",) if model == "moe" else ("model.from_scratch=true",)  # the demo
    result = run_cli("finetune", "demo", "-o", str(tmp_path / "run"), *COMMON, *model_args, *args, env=ENV,
                     timeout=600)
    assert result.exit_code == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert message in one_line(result.stderr)
    assert result.stderr.strip().splitlines()[0].startswith("error: ")
    assert "Traceback" not in result.stderr and "torchrun" not in result.stderr  # refused before launch
