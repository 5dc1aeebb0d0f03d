"""End-to-end tests of `automodel distill`: a tiny teacher (the demo model fine-tuned briefly)
distilled into a smaller student (one decoder layer instead of two), with real HF I/O and peft;
and `automodel distill demo`, which trains and caches its own teacher."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from automodel_cli import __version__
from automodel_cli.plugin_host import get_registries
from automodel_cli.training import demo_teacher
from conftest import REPO

FAST = ["logging.progress=false", "model.dtype=float32", "train.eval_batches=2"]
SMALLER = "model.config.num_hidden_layers=1"  # the demo model has 2 (the demo preset's distill default too)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A teacher of our own, `automodel finetune demo -o runs/demo-teacher` with 50 steps instead
    of 300; returns the directory holding runs/."""
    from automodel_cli.cli import main

    root = tmp_path_factory.mktemp("teacher")
    code = main(["finetune", "demo", "-o", str(root / "runs" / "demo-teacher"), "train.max_steps=50",
                 "train.eval_every_steps=null", "data.eval_split=null", *FAST])
    assert code == 0
    return root


def teacher_dir(root: Path) -> str:
    return str(root / "runs" / "demo-teacher" / "final")


def test_distillation_alone_lowers_held_out_kl(cli, teacher, tmp_path):
    """kd_weight=1: the labels are never used, so everything learnt comes from the teacher."""
    from transformers import AutoModelForCausalLM

    from automodel_cli.components.checkpoint.describe import describe

    run = tmp_path / "kd"
    result = cli("distill", "demo", "-o", str(run), f"distill.teacher_path={teacher_dir(teacher)}", SMALLER,
                 "distill.kd_weight=1.0", "distill.temperature=2.0", "train.max_steps=40",
                 "train.eval_every_steps=null", "checkpoint.every_steps=40", *FAST)
    assert result.exit_code == 0, result.stderr
    assert "teacher:" in result.stdout and "KL to teacher" in result.stdout

    summary = json.loads((run / "summary.json").read_text())
    before, after = summary["before"], summary["after"]
    assert after["eval_kl"] < 0.5 * before["eval_kl"], (before, after)
    assert after["eval_loss"] < before["eval_loss"]
    assert summary["teacher_eval"]["eval_loss"] < after["eval_loss"]

    metrics = read_metrics(run)
    assert len(metrics) == 40
    for m in metrics:  # loss = (1 - w) * CE + w * T^2 * KL with w = 1, T = 2
        assert m["loss"] == pytest.approx(4.0 * m["kl"], rel=1e-5)
        assert m["ce_loss"] > 0
    assert metrics[-1]["kl"] < metrics[0]["kl"]

    student = AutoModelForCausalLM.from_pretrained(run / "final")
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher_dir(teacher))
    assert student.config.num_hidden_layers == 1 and teacher_model.config.num_hidden_layers == 2
    student_params = sum(p.numel() for p in student.parameters())
    assert student_params < sum(p.numel() for p in teacher_model.parameters())
    # The checkpoint holds the student and its optimizer, never the teacher.
    info = describe(run)
    assert info["parameters"] == student_params
    assert "teacher_path: " + teacher_dir(teacher) in (run / "config.yaml").read_text()


def test_lora_student_saves_an_adapter_and_mixes_ce_and_kl(cli, teacher, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "lora"
    result = cli("distill", "demo", "--peft", "lora", "-o", str(run), f"distill.teacher_path={teacher_dir(teacher)}",
                 SMALLER, "distill.kd_weight=0.25", "distill.temperature=2.0", "train.max_steps=3",
                 "data.eval_split=null", *FAST)
    assert result.exit_code == 0, result.stderr
    for m in read_metrics(run):
        assert m["loss"] == pytest.approx(0.75 * m["ce_loss"] + 0.25 * 4.0 * m["kl"], rel=1e-5)
    assert json.loads((run / "final" / "adapter_config.json").read_text())["r"] == 8
    base = AutoModelForCausalLM.from_pretrained(run / "base_model")
    adapted = PeftModel.from_pretrained(base, run / "final").eval()
    plain = AutoModelForCausalLM.from_pretrained(run / "base_model").eval()
    inputs = torch.tensor([[1, 10, 11, 12, 13]])
    with torch.no_grad():
        assert not torch.allclose(adapted(inputs).logits, plain(inputs).logits)


@pytest.mark.parametrize("peft", [[], ["--peft", "lora"]], ids=["full", "lora"])
def test_fused_linear_ce_distills_exactly_like_full_logits(cli, teacher, tmp_path, peft):
    """loss.name=linear_ce: CE and KL come from the student's hidden states, never its full
    logits, and the run is the full-logits run step for step."""
    common = ["distill", "demo", *peft, f"distill.teacher_path={teacher_dir(teacher)}", SMALLER,
              "distill.kd_weight=0.5", "distill.temperature=2.0", "distill.kl=reverse", "train.max_steps=3",
              "train.eval_every_steps=null", "data.eval_split=null", *FAST]
    fused = cli(*common, "loss.name=linear_ce", "loss.linear_ce.chunk_size=16", "-o", str(tmp_path / "fused"))
    assert fused.exit_code == 0, fused.stderr
    assert "fused head: CE and KL from the student's hidden states" in fused.stdout
    full = cli(*common, "-o", str(tmp_path / "full"))
    assert full.exit_code == 0, full.stderr
    assert "fused head" not in full.stdout
    got, want = read_metrics(tmp_path / "fused"), read_metrics(tmp_path / "full")
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        for key in ("loss", "ce_loss", "kl", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=1e-4), (key, g, w)  # a 3-step trajectory: relative
    assert got[-1]["kl"] != pytest.approx(got[0]["kl"], rel=1e-3)  # it trained


def test_resume_matches_an_uninterrupted_run(cli, teacher, tmp_path):
    """Constant learning rate, so a 2-step run continued to 4 steps is the same run as 4 steps."""
    args = [f"distill.teacher_path={teacher_dir(teacher)}", SMALLER, "optim.scheduler=constant",
            "data.eval_split=null", "train.global_batch_size=16", "train.micro_batch_size=8", *FAST]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert cli("distill", "demo", "-o", str(whole), "train.max_steps=4", *args).exit_code == 0
    assert cli("distill", "demo", "-o", str(parts), "train.max_steps=2", "checkpoint.every_steps=2",
               *args).exit_code == 0
    resumed = cli("distill", "demo", "-o", str(parts), "train.max_steps=4", "checkpoint.resume=auto", *args)
    assert resumed.exit_code == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    keys = ("step", "loss", "ce_loss", "kl", "grad_norm")
    assert [[m[k] for k in keys] for m in read_metrics(parts)] == [[m[k] for k in keys] for m in read_metrics(whole)]

    other = cli("distill", "demo", "-o", str(parts), "train.max_steps=6", "checkpoint.resume=auto",
                *args, "distill.kd_weight=0.9")
    assert other.exit_code == 2 and "distill.kd_weight: saved 0.5, now 0.9" in other.stderr


def save_teacher(directory: Path, vocab_size: int, tokenizer_file: dict | None) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from automodel_cli.assets import demo_dir

    config = AutoConfig.from_pretrained(demo_dir())
    config.vocab_size = vocab_size
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    if tokenizer_file is not None:
        (directory / "tokenizer.json").write_text(json.dumps(tokenizer_file))
        PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), eos_token="</s>",
                                pad_token="<pad>").save_pretrained(directory)
    return directory


def swapped_demo_tokenizer() -> dict:
    """The demo tokenizer with the ids of `a` and `b` exchanged: same size, other vocabulary."""
    from automodel_cli.assets import demo_dir

    spec = json.loads((demo_dir() / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    return spec


@pytest.mark.parametrize("vocab_size, tokenizer, fragments", [
    (80, None, ["vocab_size 80", "student's 64", "share a tokenizer"]),
    (64, "swapped", ["64 tokens", "`a` is 9 for the teacher and 8 for the student", "share a tokenizer"]),
])
def test_teacher_with_another_vocabulary_is_refused_before_anything_is_written(cli, tmp_path, vocab_size,
                                                                                 tokenizer, fragments):
    teacher = save_teacher(tmp_path / "teacher", vocab_size, swapped_demo_tokenizer() if tokenizer else None)
    run = tmp_path / "run"
    result = cli("distill", "demo", "-o", str(run), f"distill.teacher_path={teacher}", "train.max_steps=1", *FAST)
    assert result.exit_code == 2, result.stderr
    assert "Traceback" not in result.stderr and "error: The teacher and the student" in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr
    assert not run.exists()


@pytest.mark.parametrize("args, fragments", [
    (["model.from_scratch=false"], ["distill.teacher_path is not set", "a finetune run's model is RUN_DIR/final",
                                    "`automodel distill demo` brings its own teacher"]),
    (["distill.teacher_path=./nowhere/teacher"], ["Teacher directory `./nowhere/teacher` does not exist"]),
    (["distill.teacher_path=x", "distill.kd_weight=1.5"], ["`distill.kd_weight` must be 0 <= x <= 1, got 1.5"]),
    (["distill.teacher_path=x", "distill.temperature=0"], ["`distill.temperature` must be > 0, got 0"]),
])
def test_bad_settings_are_clear_errors(cli, tmp_path, args, fragments):
    run = tmp_path / "run"
    result = cli("distill", "demo", "-o", str(run), *args)
    assert result.exit_code == 2, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr
    assert not run.exists()


# --------------------------------------------------------------------------- the demo
#: The demo teacher as these tests train it: the real mechanism (`automodel finetune demo` in a
#: child process, the cache, the atomic rename), with 30 steps instead of 300 to keep the suite
#: fast; the full teacher is the finetune demo, tested in test_finetune.py.
SHORT_TEACHER = (*demo_teacher.TEACHER_ARGS, "train.max_steps=30", "data.eval_split=null")
TINY_TEACHER = (*demo_teacher.TEACHER_ARGS, "train.max_steps=2", "data.eval_split=null")


@pytest.fixture
def demo_cache(monkeypatch, tmp_path) -> Path:
    """An empty AUTOMODEL_CACHE_DIR and the short demo teacher."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(demo_teacher.CACHE_ENV, str(cache))
    monkeypatch.setattr(demo_teacher, "TEACHER_ARGS", SHORT_TEACHER)
    return cache


def leftovers(entry: Path) -> list[Path]:
    return list(entry.parent.glob(f".{entry.name}.tmp-*"))


def test_the_demo_preset_gives_distill_a_smaller_student(cli):
    distill = cli("config", "show", "demo", "--recipe", "distill")
    assert "num_hidden_layers: 1  # from preset demo for distill" in distill.stdout
    finetune = cli("config", "show", "demo", "--recipe", "finetune")
    assert "num_hidden_layers" not in finetune.stdout
    overridden = cli("config", "show", "demo", "--recipe", "distill", "model.config.num_hidden_layers=2")
    assert "num_hidden_layers: 2  # from command line" in overridden.stdout


@pytest.mark.slow
def test_demo_command_from_the_docs_trains_its_teacher_once(cli, demo_cache, monkeypatch, tmp_path):
    """`automodel distill demo` as docs/distill.md shows it, fewer steps: the first run trains
    the teacher into the cache (clearing a killed run's leftovers), the second reuses it."""
    doc = (REPO / "docs" / "distill.md").read_text()
    block = doc.split("<!-- distill-demo-command -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    command = shlex.split(block.strip().split("&&")[-1])
    assert command == ["automodel", "distill", "demo"]
    monkeypatch.chdir(tmp_path)
    entry = demo_teacher.cache_entry(get_registries())
    assert entry.parent == demo_cache and entry.name.startswith(f"demo-teacher-{__version__}-")
    (entry.parent / f".{entry.name}.tmp-killed" / "final").mkdir(parents=True)  # a first run killed mid-way

    first = cli(*command[1:], "-o", "runs/first", "train.max_steps=20", "train.eval_every_steps=null", *FAST)
    assert first.exit_code == 0, first.stderr
    assert f"demo teacher: none cached yet, training it once (`automodel finetune demo`) and caching it in {entry}" \
        in first.stdout
    assert demo_teacher.is_complete(entry) and not leftovers(entry)
    lines = re.findall(r"(before|after) training: .*KL to teacher (\d+\.\d+)", first.stdout)
    assert [name for name, _ in lines] == ["before", "after"]
    assert float(lines[1][1]) < float(lines[0][1])
    student = json.loads((tmp_path / "runs" / "first" / "final" / "config.json").read_text())
    teacher = json.loads((entry / "final" / "config.json").read_text())
    assert student["num_hidden_layers"] == 1 and teacher["num_hidden_layers"] == 2
    assert f"teacher_path: {entry / 'final'}" in (tmp_path / "runs" / "first" / "config.yaml").read_text()

    weights = entry / "final" / "model.safetensors"
    trained_at = weights.stat().st_mtime_ns
    second = cli(*command[1:], "-o", "runs/second", "train.max_steps=2", "data.eval_split=null", *FAST)
    assert second.exit_code == 0, second.stderr
    assert f"demo teacher: using the cached {entry / 'final'}" in second.stdout
    assert "training it once" not in second.stdout
    assert weights.stat().st_mtime_ns == trained_at


@pytest.mark.slow
def test_concurrent_first_runs_train_the_demo_teacher_once(monkeypatch, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv(demo_teacher.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(demo_teacher, "TEACHER_ARGS", TINY_TEACHER)
    entry = demo_teacher.cache_entry(get_registries())
    said: list[str] = []
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: demo_teacher.ensure_teacher(entry, said.append), range(2)))
    assert paths == [entry / "final"] * 2
    assert sum("training it once" in line for line in said) == 1, said
    assert sum("trained meanwhile by another run" in line for line in said) == 1, said
    assert demo_teacher.is_complete(entry) and not leftovers(entry)


@pytest.mark.slow
def test_a_failed_teacher_training_caches_nothing(cli, monkeypatch, tmp_path):
    """The child `automodel finetune demo` fails (a mesh that needs 2 processes): one clear
    error, no cache entry, no temporary directory, no run directory."""
    monkeypatch.setenv(demo_teacher.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(demo_teacher, "TEACHER_ARGS", (*TINY_TEACHER, "distributed.tp=2"))
    entry = demo_teacher.cache_entry(get_registries())
    run = tmp_path / "run"
    result = cli("distill", "demo", "-o", str(run), *FAST)
    assert result.exit_code == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "Training the distill demo's teacher (`automodel finetune demo`) failed with exit code 2" in result.stderr
    assert "Nothing was cached" in result.stderr
    assert not entry.exists() and not leftovers(entry) and not run.exists()
