"""`train.eval_generate`: generated answers scored at every validation of `automodel finetune`,
the same on one process and under FSDP2 on two, and refused where decoding cannot run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from automodel_cli.components.logging import read_metrics
from conftest import one_line, run_cli
from model_dirs import answering_model, write_own_answers

GENERATED = ("eval_generate_exact_match", "eval_generate_contains", "eval_generate_samples")
ENV = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def own_answers_run(tmp_path: Path, name: str, *args: str) -> Path:
    """Fine-tune a random model whose data's even rows are its own greedy answers, validating
    on that data with generation at steps 0, 1 and 2."""
    model_dir = tmp_path / "model"
    data = tmp_path / "answers.jsonl"
    if not model_dir.exists():
        answering_model(model_dir)
        write_own_answers(data, model_dir, count=10, max_new_tokens=6)
    run = tmp_path / name
    result = run_cli("finetune", f"model.path={model_dir}", f"data.path={data}", f"data.eval_path={data}",
                     "-o", str(run), "train.max_steps=2", "train.eval_every_steps=1", "train.global_batch_size=4",
                     "train.micro_batch_size=2", "train.eval_generate=true", "train.eval_generate_samples=10",
                     "train.eval_max_new_tokens=6", "logging.progress=false", "model.dtype=float32",
                     *args, env=ENV, timeout=600)
    assert result.exit_code == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return run


def generation_curve(run: Path) -> list[dict]:
    summary = json.loads((run / "summary.json").read_text())
    return [{k: summary["before"][k] for k in GENERATED}] + \
        [{k: step[k] for k in ("step", *GENERATED)} for step in read_metrics(run / "metrics.jsonl")]


def test_finetune_logs_generated_answer_metrics(tmp_path):
    run = own_answers_run(tmp_path, "one")
    curve = generation_curve(run)
    # before training the model answers exactly its own greedy answers: the even half of the rows
    assert curve[0] == {"eval_generate_exact_match": 0.5, "eval_generate_contains": 0.5, "eval_generate_samples": 10}
    assert [point.get("step") for point in curve[1:]] == [1, 2]
    summary = json.loads((run / "summary.json").read_text())
    assert {"eval_loss", *GENERATED} <= set(summary["after"])


@pytest.mark.slow
def test_two_processes_generate_like_one(tmp_path):
    one = generation_curve(own_answers_run(tmp_path, "one"))
    fsdp = generation_curve(own_answers_run(tmp_path, "fsdp", "--nproc-per-node", "2"))  # FSDP2 over gloo
    tp = generation_curve(own_answers_run(tmp_path, "tp", "--nproc-per-node", "2", "distributed.tp=2"))
    # greedy answers of the same weights; no rank stopped decoding early (no hang)
    assert fsdp == one and tp == one
    assert one[0]["eval_generate_exact_match"] == 0.5


def test_refused_where_decoding_cannot_run(cli, tmp_path):
    from automodel_cli.components.distributed.mesh import MeshShape
    from automodel_cli.config.assemble import resolve_command
    from automodel_cli.errors import UserError
    from automodel_cli.plugin_host import get_registries
    from automodel_cli.training.sft_data import check_eval_generate

    registries = get_registries()
    cfg = resolve_command(registries, recipe=registries.recipes.get("finetune"), target="demo", config_files=[],
                          overrides=["train.eval_generate=true"])
    with pytest.raises(UserError, match="distributed.pp=2"):
        check_eval_generate(cfg, MeshShape.resolve(1, -1, 1, world_size=2, pp=2), vision=False)
    check_eval_generate(cfg, MeshShape.resolve(1, -1, 1, world_size=2), vision=False)  # FSDP2 generates
    run = tmp_path / "vlm"
    result = cli("finetune", "demo-vlm", "-o", str(run), "train.eval_generate=true", "train.max_steps=1")
    assert result.exit_code == 2
    assert "train.eval_generate=true generates from text prompts only" in one_line(result.stderr) and not (run / "config.yaml").exists()
