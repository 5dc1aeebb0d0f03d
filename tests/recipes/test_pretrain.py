"""End-to-end tests of `automodel pretrain` on the bundled tiny Llama: real tokenizer, real
datasets loading (local files and streaming), real checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from automodel_cli.assets import demo_dir
from tolerances import decoder_rounding, f32_tol

QUIET = ["logging.progress=false", "model.dtype=float32"]
# Own text in the tests: blocks of 32 tokens, 8 per step, in order.
SMALL = ["data.name=text", "data.max_length=32", "train.global_batch_size=8", "train.micro_batch_size=4",
         "data.eval_split=null", "train.eval_every_steps=null", "optim.warmup_steps=0", *QUIET]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def documents(n: int = 40) -> list[str]:
    return [f"story {i}: the fox named lily {'walked' if i % 2 else 'ran'} to the river {i % 7} times. "
            f"count: {' '.join(str(i + k) for k in range(8))}." for i in range(n)]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`automodel pretrain demo`, shortened: 25 steps of 16 blocks, validation before and after."""
    from automodel_cli.cli import main

    import torch

    run = tmp_path_factory.mktemp("demo") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steady on a shared machine (two threads stall when a core is busy)
    try:
        code = main(["pretrain", "demo", "-o", str(run), "train.max_steps=25", "train.global_batch_size=16",
                     "train.micro_batch_size=16", "train.eval_every_steps=null", "train.eval_batches=1",
                     "checkpoint.every_steps=25", *QUIET])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return run


def test_demo_loss_falls_and_writes_a_hf_model(demo_run):
    from transformers import AutoModelForCausalLM

    metrics = read_metrics(demo_run)
    assert [m["step"] for m in metrics] == list(range(1, 26))
    first, last = metrics[0]["loss"], sum(m["loss"] for m in metrics[-5:]) / 5
    assert first > 3.9 and last < first - 1.0  # ln(64) = 4.16 at random init
    for m in metrics:
        assert m["tokens"] == 16 * 64 and m["tokens_per_s"] > 0 and m["tflops_per_device"] > 0
        assert m["mfu"] is None  # CPU: no peak known
    summary = json.loads((demo_run / "summary.json").read_text())
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"] - 1.0
    assert summary["flops_per_token"]["total"] == 2_457_600  # see test_benchmark's hand count
    model = AutoModelForCausalLM.from_pretrained(demo_run / "final")
    assert model.config.num_hidden_layers == 2
    state = json.loads((demo_run / "checkpoints" / "step_00000025" / "train_state.json").read_text())
    assert state["data"] == {"blocks_consumed": 25 * 16}


def test_continue_from_weights_and_from_scratch_ignores_them(demo_run, cli, tmp_path):
    trained_first = read_metrics(demo_run)[0]["loss"]
    trained_last = read_metrics(demo_run)[-1]["loss"]
    common = ["data.name=demo-text", "data.max_length=64", "train.global_batch_size=16",
              "train.micro_batch_size=16", "train.max_steps=1", "data.eval_split=null", *QUIET]
    result = cli("pretrain", f"model.path={demo_run / 'final'}", "model.from_scratch=false",
                 "-o", str(tmp_path / "continued"), *common)
    assert result.exit_code == 0, result.stderr
    assert "pretrained weights" in result.stdout
    continued = read_metrics(tmp_path / "continued")[0]["loss"]
    assert continued < trained_first - 1.0 and abs(continued - trained_last) < 0.5
    # the same directory from scratch: the same random start as the demo run, weights ignored
    result = cli("pretrain", f"model.path={demo_run / 'final'}", "-o", str(tmp_path / "scratch"), *common)
    assert result.exit_code == 0, result.stderr
    # the same first step, to float32 rounding (the demo run used one thread, this one the default)
    rtol, atol = f32_tol(trained_first, **decoder_rounding(layers=2, hidden=128, intermediate=352, positions=64,
                                                           vocab=64, tokens=16 * 64))
    assert read_metrics(tmp_path / "scratch")[0]["loss"] == pytest.approx(trained_first, rel=rtol, abs=atol)


def test_from_scratch_from_a_config_json_with_overrides(cli, tmp_path):
    config = json.loads((demo_dir() / "config.json").read_text())
    config["hidden_size"], config["intermediate_size"] = 64, 96
    path = tmp_path / "my_config.json"
    path.write_text(json.dumps(config))
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in documents()))
    run = tmp_path / "run"
    result = cli("pretrain", f"model.path={path}", f"model.tokenizer={demo_dir()}", f"data.path={data}",
                 "model.config.num_hidden_layers=1", "train.max_steps=2", "-o", str(run), *SMALL)
    assert result.exit_code == 0, result.stderr
    saved = json.loads((run / "final" / "config.json").read_text())
    assert (saved["num_hidden_layers"], saved["hidden_size"], saved["intermediate_size"]) == (1, 64, 96)


def test_jsonl_txt_and_parquet_give_the_same_training(cli, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = documents()
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)))
    (tmp_path / "docs.txt").write_text("\n\n".join(texts) + "\n")
    pq.write_table(pa.table({"body": texts}), tmp_path / "docs.parquet")
    losses = {}
    for name, extra in (("jsonl", []), ("txt", []), ("parquet", ["data.text_column=body"])):
        run = tmp_path / name
        result = cli("pretrain", "demo", f"data.path={tmp_path / f'docs.{name}'}", "train.max_steps=2",
                     "data.shuffle=false", "-o", str(run), *extra, *SMALL)
        assert result.exit_code == 0, result.stderr
        assert "train data: 40 documents" in result.stdout
        losses[name] = [m["loss"] for m in read_metrics(run)]
    assert losses["jsonl"] == losses["txt"] == losses["parquet"]


def test_streaming_reads_the_same_blocks_as_map_style_in_order(cli, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in documents()))
    losses = {}
    for streaming in ("false", "true"):
        run = tmp_path / streaming
        result = cli("pretrain", "demo", f"data.path={data}", "train.max_steps=3", "data.shuffle=false",
                     f"data.streaming={streaming}", "-o", str(run), *SMALL)
        assert result.exit_code == 0, result.stderr
        losses[streaming] = [m["loss"] for m in read_metrics(run)]
    assert losses["true"] == losses["false"]
    assert "streaming" in result.stdout


# ----------------------------------------------------------------------- exact resume

STEPS = 10
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # same kernels: bitwise-equal losses


def streaming_args(data: Path, run: Path) -> list[str]:
    return ["pretrain", "demo", f"data.path={data}", "data.streaming=true", f"train.max_steps={STEPS}",
            "checkpoint.every_steps=2", "checkpoint.keep=2", "-o", str(run), *SMALL]


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "automodel_cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def losses(run: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(run)]


def test_streaming_run_killed_with_sigkill_resumes_at_the_right_block(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in documents(24)))  # a pass is 8 steps
    reference = start(streaming_args(data, tmp_path / "reference"))
    killed = start(streaming_args(data, tmp_path / "killed"))
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert killed.poll() is None, killed.stderr.read()
        assert time.monotonic() < deadline, "step 5 not reached"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err
    run = tmp_path / "killed"
    latest = (run / "checkpoints" / "latest").read_text().strip()
    state = json.loads((run / "checkpoints" / latest / "train_state.json").read_text())
    saved_step = state["step"]
    assert saved_step >= 4 and state["data"]["stream"]["blocks"] == saved_step * 8
    assert state["data"]["stream"]["document"] > 0 or state["data"]["stream"]["epoch"] > 0

    resumed = start([*streaming_args(data, run), "checkpoint.resume=auto"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"resumed from {run / 'checkpoints' / latest}" in out
    assert losses(run) == losses(tmp_path / "reference")  # every step, bitwise
    assert read_metrics(tmp_path / "reference")[-1]["epoch"] == 1  # the run crossed into a second pass


# ------------------------------------------------------------------------- bad input


def test_bad_input_is_one_paragraph_exit_2_and_nothing_written(cli, tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text("\n".join(json.dumps({"texts": t, "id": 1}) for t in documents(4)))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n   \n\n")
    config = tmp_path / "config.json"
    shutil.copy(demo_dir() / "config.json", config)
    cases = [
        ([f"data.path={texts}"], ["no `text` column", "texts, id", "Did you mean `texts`?", "data.text_column"]),
        ([f"data.path={blank}"], ["empty"]),
        ([f"data.path={texts}", "data.text_column=texts", "data.max_length=4096"],
         ["data.max_length=4096", "max_position_embeddings=128"]),
        ([f"data.path={texts}", "data.text_column=texts", "data.streaming=true", "train.max_steps=null"],
         ["train.max_steps"]),
        ([f"model.path={config}", f"data.path={texts}"], ["config file", "model.tokenizer"]),
        ([f"data.path={texts}", "--peft", "lora"], ["model.from_scratch=true", "--peft none"]),
        ([f"data.path={texts}", "data.text_column=texts", "train.global_batch_size=64"],
         ["fewer than one step of train.global_batch_size=64"]),
    ]
    for extra, phrases in cases:
        run = tmp_path / "run"
        args = [a for a in SMALL if not any(a.startswith(e.split("=")[0] + "=") for e in extra)]
        result = cli("pretrain", "demo", "-o", str(run), "train.max_steps=2", *args, *extra)
        assert result.exit_code == 2, (extra, result.stderr)
        assert "Traceback" not in result.stderr
        message = result.stderr.strip().splitlines()[-1]  # one paragraph, after any progress bars
        assert message.startswith("error: "), result.stderr
        for phrase in phrases:
            assert phrase in message, (phrase, result.stderr)
        assert not run.exists()
