"""`automodel finetune model.path=VLM_DIR` end to end on a tiny Gemma 3 vision-language model
(tests/vlm_models.py): the real CLI, real images, real HF/peft outputs and the checkpoint and
convert commands on what the run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tolerances import assert_close_f32, decoder_rounding
from vlm_models import colour_answer, gemma3_model_dir, save_vlm, vlm_inputs, write_colour_chat

ROWS = 8
#: Tokens that close an assistant turn in the tiny Gemma 3 template: `<end_of_turn>` and "\n".
TURN_END_TOKENS = 2


def args(model: Path, data: Path, run: Path, *extra: str) -> list[str]:
    return ["finetune", f"model.path={model}", f"data.path={data}", "-o", str(run), "train.global_batch_size=4",
            "train.micro_batch_size=2", "train.eval_every_steps=null", "data.eval_split=null",
            "logging.progress=false", "model.dtype=float32", "optim.lr=1e-3", *extra]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """(model directory, data file): the tiny Gemma 3 and eight image-text chat rows."""
    root = tmp_path_factory.mktemp("vlm")
    return gemma3_model_dir(root / "model"), write_colour_chat(root / "data", ROWS)


def finetune(run: Path, inputs: tuple[Path, Path], *extra: str) -> str:
    """Run `automodel finetune` in this process; its standard output."""
    import contextlib
    import io

    from automodel_cli.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(args(*inputs, run, *extra))
    assert code == 0, out.getvalue()[-3000:]
    return out.getvalue()


@pytest.fixture(scope="module")
def full_run(inputs, tmp_path_factory) -> tuple[Path, str]:
    """Four steps of full fine-tuning (two epochs), checkpoints after steps 2 and 4."""
    run = tmp_path_factory.mktemp("full") / "run"
    return run, finetune(run, inputs, "train.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep=2")


@pytest.fixture(scope="module")
def lora_run(inputs, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("lora") / "run"
    finetune(run, inputs, "--peft", "lora", "peft.rank=4", "train.max_steps=4", "checkpoint.every_steps=4")
    return run


def processor_inputs(directory: Path) -> dict[str, torch.Tensor]:
    """The saved processor of ``directory`` applied to a conversation with a new image (a colour
    the training data has in another size), as a user of final/ would call it."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(directory)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.new("RGB", (33, 41), (0, 160, 0))
    return dict(processor(text=[text], images=[image], return_tensors="pt"))


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**batch).logits


def load_vlm(directory: Path) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32)


def from_checkpoint(model_dir: Path, checkpoint: Path, adapter: Path | None = None) -> torch.nn.Module:
    """The trained model rebuilt without final/: the base model with the vision tower frozen (the
    default, so the checkpoint holds every other parameter) or with a peft adapter (whose weights
    the checkpoint then overwrites), and the trained weights from the run's DCP checkpoint."""
    from automodel_cli.components.checkpoint import load_checkpoint
    from automodel_cli.components.models.vlm import apply_freezing

    model = load_vlm(model_dir)
    if adapter is None:
        frozen = apply_freezing(model, freeze_vision=True, freeze_projector=False)
        assert frozen["vision"] > 0
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    load_checkpoint(checkpoint, model=model, optimizer=None, scheduler=None)
    return model.eval()


# ------------------------------------------------------------------------ loss mask
def test_trained_tokens_are_exactly_the_assistant_tokens(full_run):
    """Every character is one token of the tiny tokenizer, so a row's assistant tokens are its
    answer's characters and the turn's closing tokens; the image tokens, the prompt and the
    padding are not trained. Two steps of 4 rows are one epoch of the 8 rows."""
    run, out = full_run
    expected = sum(len(colour_answer(i)) + TURN_END_TOKENS for i in range(ROWS))
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[0]["label_tokens"] + metrics[1]["label_tokens"] == expected
    assert metrics[2]["label_tokens"] + metrics[3]["label_tokens"] == expected
    assert f"{ROWS} samples" in out and f"{expected} trained tokens" in out


# ------------------------------------------------------------------------ outputs
def test_final_reloads_with_processor_and_the_trained_logits(full_run, inputs):
    run, _ = full_run
    final = run / "final"
    assert (final / "processor_config.json").is_file() and (final / "chat_template.jinja").is_file()
    batch = processor_inputs(final)
    image_token = json.loads((final / "config.json").read_text())["image_token_index"]
    assert (batch["input_ids"] == image_token).sum() == 4  # the image's 4 soft tokens reach the model
    trained = logits(load_vlm(final), batch)
    assert torch.equal(trained, logits(from_checkpoint(inputs[0], run / "checkpoints" / "step_00000004"), batch))
    assert not torch.allclose(trained, logits(load_vlm(inputs[0]), batch))  # training changed the model


def test_consolidate_round_trip(full_run, cli, tmp_path):
    run, _ = full_run
    out = tmp_path / "consolidated"
    result = cli("checkpoint", "consolidate", str(run / "checkpoints" / "step_00000004"), "--out", str(out))
    assert result.exit_code == 0, result.stderr
    batch = processor_inputs(out)  # the processor files travel with the checkpoint
    assert torch.equal(logits(load_vlm(out), batch), logits(load_vlm(run / "final"), batch))


def test_hf_to_checkpoint_and_back(full_run, cli, tmp_path):
    run, _ = full_run
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    result = cli("convert", "hf-to-checkpoint", str(run / "final"), "--out", str(ckpt))
    assert result.exit_code == 0, result.stderr
    result = cli("convert", "checkpoint-to-hf", str(ckpt), "--out", str(back))
    assert result.exit_code == 0, result.stderr
    batch = processor_inputs(back)
    assert torch.equal(logits(load_vlm(back), batch), logits(load_vlm(run / "final"), batch))


def test_hf_to_checkpoint_loads_a_vlm_causal_lm_cannot(cli, tmp_path):
    """Qwen2-VL is not in AutoModelForCausalLM's mapping: the conversion loads it as the
    image-text-to-text model its config names."""
    source, ckpt, back = save_vlm(tmp_path / "qwen2_vl", "qwen2_vl"), tmp_path / "ckpt", tmp_path / "back"
    result = cli("convert", "hf-to-checkpoint", str(source), "--out", str(ckpt))
    assert result.exit_code == 0, result.stderr
    result = cli("convert", "checkpoint-to-hf", str(ckpt), "--out", str(back))
    assert result.exit_code == 0, result.stderr
    batch = vlm_inputs("qwen2_vl")
    assert torch.equal(logits(load_vlm(back), batch), logits(load_vlm(source), batch))


def test_resume_from_a_checkpoint_repeats_the_run_exactly(full_run, inputs, tmp_path):
    """Steps 3-4 resumed from the step-2 checkpoint (into a new directory) have the losses of the
    uninterrupted run bit for bit and end with the same weights."""
    from safetensors.torch import load_file

    run, _ = full_run
    resumed = tmp_path / "resumed"
    out = finetune(resumed, inputs, "train.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep=2",
                   f"checkpoint.resume={run / 'checkpoints' / 'step_00000002'}")
    assert "resumed from" in out
    expected = {m["step"]: m["loss"] for m in read_metrics(run) if m["step"] > 2}
    assert {m["step"]: m["loss"] for m in read_metrics(resumed) if m["step"] > 2} == expected
    final, again = (load_file(r / "final" / "model.safetensors") for r in (run, resumed))
    assert final.keys() == again.keys()
    assert all(torch.equal(final[k], again[k]) for k in final)


# ------------------------------------------------------------------------ LoRA
def test_lora_adapter_loads_with_peft_on_the_base_vlm(lora_run, inputs):
    from peft import PeftModel

    config = json.loads((lora_run / "final" / "adapter_config.json").read_text())
    targets = config["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets
    assert all("language_model" in t for t in targets), targets  # the text decoder only
    batch = processor_inputs(lora_run / "final")
    adapted = logits(PeftModel.from_pretrained(load_vlm(inputs[0]), lora_run / "final"), batch)
    checkpoint = lora_run / "checkpoints" / "step_00000004"
    assert torch.equal(adapted, logits(from_checkpoint(inputs[0], checkpoint, lora_run / "final"), batch))
    assert not torch.allclose(adapted, logits(load_vlm(inputs[0]), batch))  # the adapter changed something


def test_merge_lora_writes_a_vlm(lora_run, inputs, cli, tmp_path):
    from peft import PeftModel

    merged = tmp_path / "merged"
    result = cli("convert", "merge-lora", str(lora_run / "final"), "--out", str(merged))
    assert result.exit_code == 0, result.stderr
    assert json.loads((merged / "config.json").read_text())["model_type"] == "gemma3"
    batch = processor_inputs(merged)
    adapted = logits(PeftModel.from_pretrained(load_vlm(inputs[0]), lora_run / "final"), batch)
    # float32 rounding of the tiny decoder's forward with a rank-4 adapter merged (tests/tolerances.py)
    positions = batch["input_ids"].shape[1]
    assert_close_f32(logits(load_vlm(merged), batch), adapted,
                     **decoder_rounding(layers=2, hidden=64, intermediate=96, positions=positions, merged_rank=4))


def test_consolidate_merges_a_vlm_lora_checkpoint(lora_run, inputs, cli, tmp_path):
    from peft import PeftModel

    merged = tmp_path / "merged"
    result = cli("checkpoint", "consolidate", str(lora_run / "checkpoints" / "step_00000004"), "--merge-lora",
                 "--out", str(merged))
    assert result.exit_code == 0, result.stderr
    batch = processor_inputs(merged)
    adapted = logits(PeftModel.from_pretrained(load_vlm(inputs[0]), lora_run / "final"), batch)
    positions = batch["input_ids"].shape[1]
    assert_close_f32(logits(load_vlm(merged), batch), adapted,
                     **decoder_rounding(layers=2, hidden=64, intermediate=96, positions=positions, merged_rank=4))


# ------------------------------------------------------------------------ processes
@pytest.mark.slow
def test_two_processes_match_one(inputs, tmp_path):
    """FSDP2 over 2 gloo processes trains the same samples per step as 1 process: per-step losses
    agree over 5 steps (float32 reductions in another order, fed forward step to step)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    losses = {}
    for nproc in (1, 2):
        run = tmp_path / f"nproc{nproc}"
        command = [sys.executable, "-m", "automodel_cli", *args(*inputs, run, "train.max_steps=5"),
                   "--nproc-per-node", str(nproc)]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        losses[nproc] = [m["loss"] for m in read_metrics(run)]
        assert (run / "final" / "model.safetensors").is_file()
    assert len(losses[1]) == 5
    assert losses[2] == pytest.approx(losses[1], abs=1e-4)
