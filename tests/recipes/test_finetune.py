"""End-to-end tests of `automodel finetune` on the bundled tiny model: real HF I/O, real peft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tolerances import assert_close_f32, decoder_rounding

TINY = ["train.global_batch_size=8", "train.micro_batch_size=4", "train.eval_every_steps=null",
        "data.eval_split=null", "logging.progress=false", "model.dtype=float32"]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def demo_inputs() -> torch.Tensor:
    return torch.tensor([[1, 10, 11, 12, 13, 14, 15, 16, 17], [1, 20, 21, 22, 23, 24, 25, 26, 27]])


def model_from_checkpoint(run: Path, step: int, peft_method: str = "none"):
    """Rebuild the trained model independently of final/: demo config + checkpoint weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from automodel_cli.assets import demo_dir
    from automodel_cli.components.checkpoint import load_checkpoint

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(demo_dir()))
    if peft_method != "none":
        from peft import PeftModel

        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(run / "base_model"), run / "final", is_trainable=True)
    load_checkpoint(run / "checkpoints" / f"step_{step:08d}", model=model, optimizer=None, scheduler=None)
    return model.eval()


def test_full_finetune_writes_hf_dir_metrics_and_config(cli, tmp_path):
    run = tmp_path / "run"
    result = cli("finetune", "demo", "-o", str(run), "train.max_steps=6", "checkpoint.every_steps=6", *TINY)
    assert result.exit_code == 0, result.stderr

    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    for m in metrics:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(m)
        assert m["tokens"] > 0 and m["tokens_per_s"] > 0 and m["loss"] > 0
    config = (run / "config.yaml").read_text()
    assert "max_steps: 6" in config and f"output_dir: {run}" in config

    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    assert AutoTokenizer.from_pretrained(run / "final").eos_token == "</s>"
    assert (run / "final" / "model.safetensors").exists()
    assert (run / "final" / "generation_config.json").exists()
    reference = model_from_checkpoint(run, 6)
    with torch.no_grad():
        assert torch.equal(final(demo_inputs()).logits, reference(demo_inputs()).logits)


def test_lora_writes_adapter_that_peft_loads_and_merged_model(cli, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "lora"
    result = cli("finetune", "demo", "--peft", "lora", "-o", str(run), "train.max_steps=4",
                 "checkpoint.every_steps=4", "peft.merge=true", "peft.rank=4", *TINY)
    assert result.exit_code == 0, result.stderr
    adapter_config = json.loads((run / "final" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and not adapter_config.get("use_dora")
    adapted_layers = {name.rsplit(".", 1)[-1] for name in adapter_config["target_modules"]}
    assert adapted_layers == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    base = AutoModelForCausalLM.from_pretrained(run / "base_model")
    adapted = PeftModel.from_pretrained(base, run / "final").eval()
    merged = AutoModelForCausalLM.from_pretrained(run / "final" / "merged").eval()
    reference = model_from_checkpoint(run, 4, "lora")
    with torch.no_grad():
        logits = adapted(demo_inputs()).logits
        assert torch.equal(logits, reference(demo_inputs()).logits)
        # float32 rounding of the demo model's forward with a rank-4 adapter merged (tests/tolerances.py)
        assert_close_f32(merged(demo_inputs()).logits, logits,
                         **decoder_rounding(layers=2, hidden=128, intermediate=352, positions=9, merged_rank=4))
        plain = AutoModelForCausalLM.from_pretrained(run / "base_model").eval()(demo_inputs()).logits
        assert not torch.allclose(plain, logits)  # the adapter changed something


def test_dora_uses_peft_dora(cli, tmp_path):
    run = tmp_path / "dora"
    result = cli("finetune", "demo", "--peft", "dora", "-o", str(run), "train.max_steps=2", *TINY)
    assert result.exit_code == 0, result.stderr
    assert json.loads((run / "final" / "adapter_config.json").read_text())["use_dora"] is True


def test_global_batch_is_the_unit_micro_batch_does_not_change_the_math(cli, tmp_path):
    losses = {}
    for micro in (2, 8):
        run = tmp_path / f"micro{micro}"
        args = [a for a in TINY if not a.startswith("train.micro_batch_size")]
        result = cli("finetune", "demo", "-o", str(run), "train.max_steps=3",
                     f"train.micro_batch_size={micro}", *args)
        assert result.exit_code == 0, result.stderr
        losses[micro] = [m["loss"] for m in read_metrics(run)]
    # three steps of a trajectory; micro-batches sum the loss and gradients in another order, and each
    # step carries the last one's differences, so relative
    assert losses[2] == pytest.approx(losses[8], rel=1e-5)


def test_activation_checkpointing_gives_the_same_losses(cli, tmp_path):
    losses = []
    for flag in ("false", "true"):
        run = tmp_path / f"ac-{flag}"
        result = cli("finetune", "demo", "-o", str(run), "train.max_steps=2",
                     f"train.activation_checkpointing={flag}", *TINY)
        assert result.exit_code == 0, result.stderr
        losses.append([m["loss"] for m in read_metrics(run)])
    # two steps of a trajectory: relative, as any comparison of training curves
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_packing_trains_and_reports_padding(cli, tmp_path):
    run = tmp_path / "packed"
    result = cli("finetune", "demo", "-o", str(run), "train.max_steps=2", "data.packing=true", *TINY)
    assert result.exit_code == 0, result.stderr
    assert "packing: 4000 samples into" in result.stdout and "padding" in result.stdout
    assert len(read_metrics(run)) == 2


def test_validation_metrics_before_and_after(cli, tmp_path):
    run = tmp_path / "eval"
    args = [a for a in TINY if not a.startswith("data.eval_split")]
    result = cli("finetune", "demo", "-o", str(run), "train.max_steps=2", "train.eval_batches=2", *args)
    assert result.exit_code == 0, result.stderr
    assert "before training: eval loss" in result.stdout and "after training:  eval loss" in result.stdout
    last = read_metrics(run)[-1]
    assert {"eval_loss", "eval_exact_match", "eval_token_accuracy"} <= set(last)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]


def test_chat_messages_data(cli, tmp_path):
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"reverse {w}"},
                          {"role": "assistant", "content": w[::-1]}]} for w in ["abc", "defg", "hij", "bad"] * 4]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    run = tmp_path / "chat"
    result = cli("finetune", "demo", "-o", str(run), f"data.path={data}", "data.name=instruction",
                 "train.max_steps=2", *TINY)
    assert result.exit_code == 0, result.stderr
    assert "train data: 16 samples" in result.stdout
    assert len(read_metrics(run)) == 2


def test_squad_schema_local_file(cli, tmp_path):
    data = tmp_path / "squad.jsonl"
    row = {"id": "1", "title": "t", "context": "abc def", "question": "first?",
           "answers": {"text": ["abc"], "answer_start": [0]}}
    data.write_text("\n".join(json.dumps({**row, "id": str(i)}) for i in range(8)))
    run = tmp_path / "squad"
    result = cli("finetune", "demo", "-o", str(run), f"data.path={data}", "data.name=squad",
                 "train.max_steps=1", *TINY)
    assert result.exit_code == 0, result.stderr
    assert len(read_metrics(run)) == 1


def test_tensorboard_logger(cli, tmp_path):
    run = tmp_path / "tb"
    result = cli("finetune", "demo", "-o", str(run), "train.max_steps=2", "logging.loggers=[tensorboard]", *TINY)
    assert result.exit_code == 0, result.stderr
    assert list(run.rglob("events.out.tfevents.*"))


def test_the_generation_snippet_of_the_docs_runs_on_a_demo_run(cli, tmp_path, monkeypatch, capsys):
    """docs/finetune.md's Python snippet: its prompt and answer are a row of the demo's
    validation data written exactly as in training (trailing newline included), and it runs
    against the final/ of `automodel finetune demo` in its default output directory."""
    import re
    import runpy

    from automodel_cli.assets import demo_dir
    from conftest import REPO

    snippet = (REPO / "docs" / "finetune.md").read_text().split("```python", 1)[1].split("```", 1)[0]
    prompt = re.search(r'^prompt = "(.*?)"', snippet, re.MULTILINE).group(1).encode().decode("unicode_escape")
    answer = snippet.strip().rsplit("# ", 1)[1]
    rows = [json.loads(line) for line in (demo_dir() / "eval.jsonl").read_text().splitlines()]
    assert {"prompt": prompt, "completion": answer} in rows
    monkeypatch.chdir(tmp_path)
    assert cli("finetune", "demo", "train.max_steps=2", *TINY).exit_code == 0  # runs/finetune-demo-<time>/
    (tmp_path / "snippet.py").write_text(snippet)
    runpy.run_path(str(tmp_path / "snippet.py"))
    assert capsys.readouterr().out.endswith("\n")  # it printed the (2-step, so wrong) answer
