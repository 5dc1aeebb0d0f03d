"""Real multi-process runs of the demo compared with one process, shared by the tests of each
parallel dimension (tests/recipes/test_context_parallel_runs.py, test_pipeline_runs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from automodel_cli.components.logging import read_metrics
from conftest import run_cli

#: Settings every compared run shares: 5 steps of 8 samples in micro-batches of 2, float32.
COMMON = ("train.max_steps=5", "train.global_batch_size=8", "train.micro_batch_size=2",
          "train.eval_every_steps=null", "logging.progress=false", "model.dtype=float32")
ENV = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
#: What must match the single process, step by step.
COMPARED = ("loss", "grad_norm", "eval_loss")


def train(recipe: str, run: Path, *args: str, common: tuple[str, ...] = COMMON):
    """``automodel RECIPE demo -o RUN`` with ``common`` and ``args``; the result, asserted 0."""
    result = run_cli(recipe, "demo", "-o", str(run), *common, *args, env=ENV, timeout=600)
    assert result.exit_code == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def curve(run: Path, compared: tuple[str, ...] = COMPARED) -> list[dict]:
    """Each step's compared metrics from the run's metrics.jsonl."""
    return [{k: v for k, v in step.items() if k in ("step", *compared)} for step in read_metrics(run / "metrics.jsonl")]


def train_groups(root: Path, groups: dict[str, dict[str, tuple[str, ...]]], common: tuple[str, ...] = COMMON) -> dict:
    """Run every variant of every group (a group is named ``RECIPE`` or ``RECIPE-what``):
    {(group, variant): (run directory, result)}."""
    out = {}
    for group, variants in groups.items():
        recipe = group.split("-")[0]
        for name, args in variants.items():
            out[group, name] = (root / f"{group}-{name}", train(recipe, root / f"{group}-{name}", *args, common=common))
    return out


def assert_same_curve(got: list[dict], expected: list[dict], what: str, rel: float) -> None:
    """The same steps and metrics, each value within ``rel`` of the expected one."""
    assert [s["step"] for s in got] == [s["step"] for s in expected], what
    for mine, theirs in zip(got, expected):
        assert set(mine) == set(theirs), (what, mine["step"])
        for key, value in theirs.items():
            assert mine[key] == pytest.approx(value, rel=rel, abs=1e-12), (what, mine["step"], key)
