"""End-to-end tests of `automodel dpo` on a saved tiny Llama (the demo architecture) with real HF
I/O, peft and metrics.jsonl: the first step of DPO, LoRA's adapter-disabled reference, packing,
reference-free losses, bad data; slow: 1 vs 2 processes, kill -9 resume, the demo."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from automodel_cli.components.data.preference_demo import near_miss
from automodel_cli.components.logging import read_metrics
from conftest import run_cli, tree_digest
from model_dirs import save_model

FAST = ["logging.progress=false", "model.dtype=float32", "train.global_batch_size=4", "train.micro_batch_size=2",
        "train.eval_every_steps=null", "optim.lr=1e-3"]
NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def pairs(count: int, offset: int = 0) -> list[dict]:
    words = ["abc", "hgfe", "jiab", "cdeaf", "bbaj", "gahd", "fie", "dcba"]
    rows = []
    for i in range(offset, offset + count):
        word = words[i % len(words)] + "abcdefghij"[i % 10]
        answer = word[::-1]
        rows.append({"prompt": f"reverse: {word}\n", "chosen": answer, "rejected": near_miss(answer, i)})
    return rows


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dpo")
    return {"model": save_model(root / "model"), "train": jsonl(root / "train.jsonl", pairs(16)),
            "eval": jsonl(root / "eval.jsonl", pairs(4, offset=16))}


def dpo_args(files: dict[str, Path], run: Path, *extra: str) -> list[str]:
    return ["dpo", f"model.path={files['model']}", f"data.path={files['train']}", "-o", str(run), *FAST, *extra]


def test_first_step_of_dpo_is_log_2_and_rewards_rise(cli, files, tmp_path):
    run = tmp_path / "run"
    result = cli(*dpo_args(files, run, "train.max_steps=4", f"data.eval_path={files['eval']}"))
    assert result.exit_code == 0, result.stderr
    assert "reference:" in result.stdout and "a frozen copy" in result.stdout
    steps = read_metrics(run / "metrics.jsonl")
    first = steps[0]
    assert first["loss"] == pytest.approx(math.log(2), rel=0, abs=1e-6)  # policy == reference before any update
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0
    assert all(name in step for name in NAMES for step in steps)
    assert steps[-1]["rewards/margins"] > 0 and steps[-1]["loss"] < math.log(2)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["before"]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert summary["after"]["eval_rewards/margins"] > 0 and summary["after"]["eval_pairs"] == 4
    assert (run / "final" / "config.json").exists()


def test_evaluate_scores_a_dpo_runs_chosen_responses(cli, files, tmp_path):
    """`automodel evaluate RUN` on a dpo run reads the run's pairs as prompt -> chosen answer: the
    same numbers as naming that data and column by hand on the run's final model."""
    run = tmp_path / "run"
    result = cli(*dpo_args(files, run, "train.max_steps=1", f"data.eval_path={files['eval']}"))
    assert result.exit_code == 0, result.stderr
    reports = []
    for args in ((str(run),), (str(run / "final"), f"data.path={files['eval']}", "data.completion_column=chosen")):
        result = cli("evaluate", *args, "evaluate.max_new_tokens=8", "--json")
        assert result.exit_code == 0, result.stderr
        reports.append(json.loads(result.stdout)["metrics"])
    by_run, by_hand = reports
    assert by_run["loss"] > 0 and by_run["samples"] == by_run["generate_samples"] == 4  # the run's eval pairs
    assert by_run == by_hand


def test_lora_reference_is_the_base_with_the_adapter_disabled(cli, files, tmp_path):
    """The adapter-disabled policy and a frozen copy of the base give the same losses and rewards
    step after step (they differ by float32 rounding at most)."""
    runs = {}
    for name, extra in (("adapter", ()), ("copy", (f"dpo.reference_path={files['model']}",))):
        runs[name] = tmp_path / name
        result = cli(*dpo_args(files, runs[name], "--peft", "lora", "train.max_steps=3", *extra))
        assert result.exit_code == 0, result.stderr
        assert ("adapter disabled" in result.stdout) == (name == "adapter")
    adapter, copy = (read_metrics(runs[name] / "metrics.jsonl") for name in ("adapter", "copy"))
    assert adapter[-1]["rewards/margins"] != 0  # the adapter has moved the policy away from the base
    for mine, theirs in zip(adapter, copy):
        for name in NAMES:
            assert mine[name] == pytest.approx(theirs[name], rel=1e-5, abs=1e-7), (mine["step"], name)


def test_packed_pairs_train_like_unpacked(cli, files, tmp_path):
    """data.packing=true packs each micro-batch's sequences into rows, each isolated: the same
    per-step losses as the padded batches."""
    curves = {}
    for packing in ("false", "true"):
        run = tmp_path / f"packing-{packing}"
        assert cli(*dpo_args(files, run, "train.max_steps=3", f"data.packing={packing}")).exit_code == 0
        curves[packing] = read_metrics(run / "metrics.jsonl")
    for packed, padded in zip(curves["true"], curves["false"]):
        for name in NAMES:
            assert packed[name] == pytest.approx(padded[name], rel=1e-4, abs=1e-6), (packed["step"], name)


@pytest.mark.parametrize("loss, logged", [("orpo", "nll_loss"), ("simpo", "rewards/margins"), ("ipo", "loss"),
                                          ("hinge", "loss")])
def test_every_loss_trains(cli, files, tmp_path, loss, logged):
    run = tmp_path / loss
    result = cli(*dpo_args(files, run, "train.max_steps=2", f"dpo.loss={loss}"))
    assert result.exit_code == 0, result.stderr
    assert ("reference-free" in result.stdout) == (loss in ("orpo", "simpo"))
    steps = read_metrics(run / "metrics.jsonl")
    assert all(math.isfinite(step[logged]) for step in steps)


def test_precomputed_reference_gives_the_same_losses(cli, files, tmp_path):
    curves = {}
    for precompute in ("false", "true"):
        run = tmp_path / f"precompute-{precompute}"
        result = cli(*dpo_args(files, run, "train.max_steps=3", f"dpo.precompute_reference={precompute}"))
        assert result.exit_code == 0, result.stderr
        curves[precompute] = read_metrics(run / "metrics.jsonl")
    assert "precomputed" in result.stdout and "freed" in result.stdout
    for mine, theirs in zip(curves["true"], curves["false"]):
        for name in NAMES:
            assert mine[name] == pytest.approx(theirs[name], rel=1e-5, abs=1e-7), (mine["step"], name)


def with_reference_columns(model_dir: Path, rows: list[dict], path: Path) -> tuple[Path, float]:
    """``rows`` with TRL's ``ref_chosen_logps``/``ref_rejected_logps``: each response's summed
    log-probability under ``model_dir``, one pair at a time (unpadded); and the largest |value|."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from automodel_cli.training.preference_data import PairCollator, PairEncoder, model_inputs
    from automodel_cli.training.reference import response_logps

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    encoder, collate = PairEncoder(tokenizer, None), PairCollator(tokenizer.pad_token_id or 0)
    out, largest = [], 0.0
    for index, row in enumerate(rows):
        batch = collate([encoder.encode(row["prompt"], row["chosen"], row["rejected"], index,
                                        ("prompt", "chosen", "rejected"))])
        with torch.no_grad():
            logps, _ = response_logps(model, model_inputs(batch, "cpu"), batch["labels"], batch["sequence_index"], 2)
        chosen, rejected = logps.tolist()
        largest = max(largest, abs(chosen), abs(rejected))
        out.append({**row, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected})
    return jsonl(path, out), largest


def test_reference_log_probs_in_the_data_replace_the_reference_model(cli, files, tmp_path):
    """Rows carrying the reference's log-probabilities (TRL's columns) train exactly as the frozen
    copy that computed them, and no reference model is loaded."""
    train, largest = with_reference_columns(files["model"], pairs(16), tmp_path / "train.jsonl")
    evaluation, _ = with_reference_columns(files["model"], pairs(4, offset=16), tmp_path / "eval.jsonl")
    copy = tmp_path / "copy"
    result = cli(*dpo_args(files, copy, "train.max_steps=3", f"data.eval_path={files['eval']}"))
    assert result.exit_code == 0, result.stderr
    from_data = tmp_path / "data"
    result = cli("dpo", f"model.path={files['model']}", f"data.path={train}", f"data.eval_path={evaluation}",
                 "-o", str(from_data), *FAST, "train.max_steps=3")
    assert result.exit_code == 0, result.stderr
    assert "log-probabilities from the data" in result.stdout and "frozen copy" not in result.stdout
    # The copy sums each response's log-probabilities in padded micro-batches, the data one pair at a
    # time: float32 rounding of sums of magnitude <= largest, times beta (0.1) in the rewards.
    rounding = 64 * 1.19e-7 * largest
    for mine, theirs in zip(read_metrics(from_data / "metrics.jsonl"), read_metrics(copy / "metrics.jsonl")):
        for name in NAMES:
            assert mine[name] == pytest.approx(theirs[name], rel=1e-5, abs=rounding), (mine["step"], name)
    summary = json.loads((from_data / "summary.json").read_text())
    assert summary["reference"] == "data"
    assert summary["after"]["eval_loss"] == pytest.approx(
        json.loads((copy / "summary.json").read_text())["after"]["eval_loss"], rel=1e-5, abs=rounding)


# ------------------------------------------------------------------------------ bad input
def expect_user_error(result, *fragments):
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    text = " ".join(result.stderr.split())
    for fragment in fragments:
        assert fragment in text, result.stderr


@pytest.mark.parametrize("rows, fragments", [
    ([{"prompt": "a", "chosen": "b", "rejectd": "c"}] * 4, ["no `rejected` column", "`rejectd`", "dpo.rejected_column"]),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b", "rejected": "b"},
      {"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "x", "chosen": "d", "rejected": "d"}],
     ["2 pair(s)", "rows 1, 3", "dpo.drop_identical_pairs=true"]),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "  ", "rejected": "c"}],
     ["row 1", "`chosen` response is empty"]),
    ([{"prompt": "a", "chosen": "b", "rejected": "c", "ref_chosen_logps": -3.0}] * 2,
     ["`ref_chosen_logps` column but not `ref_rejected_logps`"]),
    ([{"prompt": "a", "chosen": "b", "rejected": "c", "ref_chosen_logps": -3.0, "ref_rejected_logps": -2.0},
      {"prompt": "a", "chosen": "b", "rejected": "c", "ref_chosen_logps": 1.5, "ref_rejected_logps": -2.0}],
     ["row 1", "`ref_chosen_logps` is 1.5, not a log-probability"]),
], ids=["missing-column", "identical", "empty", "one-reference-column", "positive-log-probability"])
def test_bad_preference_data_exits_2_and_leaves_the_run_dir_alone(cli, files, tmp_path, rows, fragments):
    data = jsonl(tmp_path / "bad.jsonl", rows)
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    before = tree_digest(run)
    expect_user_error(cli("dpo", f"model.path={files['model']}", f"data.path={data}", "-o", str(run), *FAST,
                          "train.max_steps=1"), *fragments)
    assert tree_digest(run) == before


def test_identical_pairs_can_be_dropped_with_a_warning(cli, files, tmp_path):
    data = jsonl(tmp_path / "d.jsonl", pairs(4) + [{"prompt": "a", "chosen": "b", "rejected": "b"}])
    result = cli("dpo", f"model.path={files['model']}", f"data.path={data}", "-o", str(tmp_path / "run"), *FAST,
                 "train.max_steps=1", "dpo.drop_identical_pairs=true")
    assert result.exit_code == 0, result.stderr
    assert "dropped 1 pair(s) whose chosen equals the rejected" in result.stdout


def test_chat_pairs_score_only_the_answer(files):
    """The chat layouts give the same tokens, and only the assistant answer is scored."""
    from transformers import AutoTokenizer

    from automodel_cli.training.preference_data import PairEncoder

    encoder = PairEncoder(AutoTokenizer.from_pretrained(files["model"]), None)
    user = {"role": "user", "content": "reverse: abc"}
    implicit = encoder.encode(None, [user, {"role": "assistant", "content": "cba"}],
                              [user, {"role": "assistant", "content": "cab"}], 0, ("prompt", "chosen", "rejected"))
    explicit = encoder.encode([user], [{"role": "assistant", "content": "cba"}], "cab", 0,
                              ("prompt", "chosen", "rejected"))
    assert implicit == explicit
    # UltraFeedback's layout: a prompt string and whole conversations (the user turn not said twice)
    ultrafeedback = encoder.encode("reverse: abc", [user, {"role": "assistant", "content": "cba"}],
                                   [user, {"role": "assistant", "content": "cab"}], 0, ("prompt", "chosen", "rejected"))
    assert ultrafeedback == explicit
    ids, labels = implicit["chosen"]
    scored = encoder.tokenizer.decode([label for label in labels if label != -100])
    assert scored.startswith("cba") and "reverse" not in scored and "user" not in scored


def test_dpo_refuses_pipeline_parallelism(cli, files, tmp_path):
    expect_user_error(cli(*dpo_args(files, tmp_path / "run", "distributed.pp=2", "--nproc-per-node", "2")),
                      "distributed.pp=2", "not by `automodel dpo`")


# ------------------------------------------------------------------------------ slow
@pytest.mark.slow
def test_two_processes_match_one(files, tmp_path):
    """FSDP2 on 2 processes (gloo): pairs split over the ranks, normalised by the step's pairs;
    tensor parallelism on 2: the policy and its frozen reference copy sharded by the same plan."""
    from parallel_runs import ENV

    curves = {}
    for name, extra in (("one", ("--nproc-per-node", "1")), ("fsdp2", ("--nproc-per-node", "2")),
                        ("tp2", ("--nproc-per-node", "2", "distributed.tp=2"))):
        run = tmp_path / name
        result = run_cli(*dpo_args(files, run, "train.max_steps=4", *extra), env=ENV, timeout=600)
        assert result.exit_code == 0, result.stdout[-2000:] + result.stderr[-4000:]
        curves[name] = read_metrics(run / "metrics.jsonl")
    for variant in ("fsdp2", "tp2"):
        assert len(curves[variant]) == len(curves["one"]) == 4
        for two, one in zip(curves[variant], curves["one"]):
            for name in (*NAMES, "grad_norm"):
                assert two[name] == pytest.approx(one[name], rel=1e-4, abs=1e-6), (variant, two["step"], name)


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_losses(files, tmp_path):
    import os
    import subprocess
    import sys

    from test_finetune_resume import kill_then_resume

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    args = [*dpo_args(files, tmp_path / "x", "train.max_steps=8", "checkpoint.every_steps=2")]

    def start(run: Path, *extra: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "automodel_cli", *args[:args.index("-o")], "-o", str(run),
                   *args[args.index("-o") + 2:], *extra]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def losses(run: Path) -> list[tuple]:
        return [tuple(step[name] for name in ("step", *NAMES)) for step in read_metrics(run / "metrics.jsonl")]

    whole = tmp_path / "whole"
    assert start(whole).wait(timeout=600) == 0
    killed = tmp_path / "killed"
    kill_then_resume(start, killed, 5)
    assert losses(killed) == losses(whole)  # every step, bitwise


@pytest.mark.slow
def test_demo_raises_preference_accuracy(tmp_path):
    result = run_cli("dpo", "demo", "-o", str(tmp_path / "demo"), "logging.progress=false",
                     env={"OMP_NUM_THREADS": "2"}, timeout=900)
    assert result.exit_code == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    before, after = summary["before"], summary["after"]
    assert "before training:" in result.stdout and "after training:" in result.stdout
    assert after["eval_rewards/accuracies"] >= before["eval_rewards/accuracies"] + 0.5, (before, after)
    assert after["eval_loss"] < before["eval_loss"] - 0.05


def test_memory_plan_counts_both_sequences_and_the_reference_copy(cli, files, tmp_path):
    plans = {}
    for name, extra in (("full", ()), ("lora", ("--peft", "lora")), ("precomputed", ("dpo.precompute_reference=true",))):
        result = cli(*dpo_args(files, tmp_path / name, "--dry-run", *extra))
        assert result.exit_code == 0, result.stderr
        plans[name] = result.stdout
    assert "micro-batch 4 x" in plans["full"]  # 2 pairs: 4 sequences
    assert "dpo: the reference model's weights" in plans["full"]
    assert "reference model" not in plans["lora"] and "reference model" not in plans["precomputed"]
