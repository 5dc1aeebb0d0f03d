"""`automodel convert ...` through the Typer sub-app, checked with real ``from_pretrained`` /
``PeftModel.from_pretrained`` loads of tiny models built from the bundled demo config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from automodel_cli.assets import demo_dir
from automodel_cli.commands.convert import convert_app
from tolerances import assert_close_f32, decoder_rounding

INPUTS = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(0))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def convert(*args):
    result = CliRunner().invoke(convert_app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def demo_model(seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(demo_dir())
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


@torch.no_grad()
def logits(model) -> torch.Tensor:
    model.eval()
    return model(input_ids=INPUTS).logits.float()


def load(path: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def assert_left_nothing(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny llama (tied embeddings, as the demo config) saved with save_pretrained + tokenizer."""
    path = tmp_path_factory.mktemp("hf") / "model"
    demo_model(seed=1).save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copyfile(demo_dir() / name, path / name)
    return path


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "untied"
    demo_model(seed=2, tie_word_embeddings=False).save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copyfile(demo_dir() / name, path / name)
    return path


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, hf_dir) -> Path:
    from peft import LoraConfig, get_peft_model

    path = tmp_path_factory.mktemp("lora") / "adapter"
    torch.manual_seed(3)
    peft_model = get_peft_model(load(hf_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():  # LoRA B starts at zero: make the adapter do something
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    peft_model.save_pretrained(path)
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(hf_dir)
    return path


# ---------------------------------------------------------------------------- dtype
@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype_rewrites_weights_and_loads(hf_dir, tmp_path, dtype, torch_dtype):
    out = tmp_path / "out"
    result = convert("dtype", hf_dir, "--out", out, "--dtype", dtype)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch_dtype}
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == str(torch_dtype).removeprefix("torch.")
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        assert (out / name).read_bytes() == (hf_dir / name).read_bytes()

    converted = load(out)
    assert converted.dtype == torch_dtype
    expected = load(hf_dir, dtype=torch_dtype)  # the original, cast on load
    original = load(hf_dir).state_dict()
    for name, tensor in converted.state_dict().items():
        assert torch.equal(tensor, original[name].to(torch_dtype)), name
    torch.testing.assert_close(logits(converted), logits(expected), rtol=0, atol=0)
    torch.testing.assert_close(logits(converted), logits(load(hf_dir)), rtol=0.05, atol=0.05)
    assert_left_nothing(tmp_path)


def test_dtype_keeps_sharding_under_max_shard_size_and_round_trips_to_fp32(untied_dir, tmp_path):
    half = tmp_path / "half"
    assert convert("dtype", untied_dir, "-o", half, "--dtype", "bf16", "--max-shard-size", "40KB").exit_code == 0
    assert (half / "model.safetensors.index.json").is_file()
    assert len(list(half.glob("model-*-of-*.safetensors"))) > 1
    full = tmp_path / "full"
    assert convert("dtype", half, "-o", full, "--dtype", "fp32").exit_code == 0
    torch.testing.assert_close(logits(load(full)), logits(load(half).float()), rtol=0, atol=0)


# ------------------------------------------------------------------------- merge-lora
@pytest.mark.parametrize("explicit_base", [False, True])
def test_merge_lora_matches_peft(hf_dir, adapter_dir, tmp_path, explicit_base):
    from peft import PeftModel

    out = tmp_path / "merged"
    args = ["merge-lora", adapter_dir, "--out", out] + (["--base", hf_dir] if explicit_base else [])
    result = convert(*args)
    assert result.exit_code == 0, result.output
    assert not (out / "adapter_config.json").exists()
    for name in TOKENIZER_FILES:
        assert (out / name).is_file()
    expected = logits(PeftModel.from_pretrained(load(hf_dir), adapter_dir))
    assert not torch.allclose(expected, logits(load(hf_dir)), atol=1e-3)  # the adapter matters
    # float32 rounding of the demo model's logits with the rank-4 adapter merged (tests/tolerances.py)
    assert_close_f32(logits(load(out)), expected,
                     **decoder_rounding(layers=2, hidden=128, intermediate=352, positions=10, merged_rank=4))
    assert_left_nothing(tmp_path)


def test_merge_lora_with_dtype(hf_dir, adapter_dir, tmp_path):
    out = tmp_path / "merged"
    assert convert("merge-lora", adapter_dir, "--out", out, "--dtype", "bf16").exit_code == 0
    model = load(out)
    assert model.dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


# ------------------------------------------------------------------ hf <-> checkpoint
@pytest.mark.parametrize("fixture", ["hf_dir", "untied_dir"])
def test_hf_to_checkpoint_round_trip(request, tmp_path, fixture):
    from automodel_cli.components.checkpoint.describe import describe

    source = request.getfixturevalue(fixture)
    ckpt = tmp_path / "ckpt"
    result = convert("hf-to-checkpoint", source, "--out", ckpt)
    assert result.exit_code == 0, result.output
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["format_version"] == 2 and meta["step"] == 0 and meta["peft"] is None
    assert meta["hf_architecture"] == "LlamaForCausalLM"
    assert not (ckpt / "optim").exists()
    assert (ckpt / "hf" / "config.json").is_file() and (ckpt / "hf" / "tokenizer.json").is_file()
    info = describe(ckpt, verify=True)
    assert "model.embed_tokens.weight" in {t["name"] for t in info["tensors"]}
    assert info["optimizer"] is None
    from automodel_cli.commands.checkpoint import checkpoint_app

    shown = CliRunner().invoke(checkpoint_app, ["inspect", str(ckpt)])
    assert shown.exit_code == 0, shown.output
    assert "optimizer" not in shown.output.split("tensor ")[0]

    back = tmp_path / "back"
    result = convert("checkpoint-to-hf", ckpt, "--out", back)
    assert result.exit_code == 0, result.output
    assert "wrote model from step 0" in result.output
    for name in TOKENIZER_FILES:
        assert (back / name).read_bytes() == (source / name).read_bytes()
    torch.testing.assert_close(logits(load(back)), logits(load(source)), rtol=0, atol=0)
    assert_left_nothing(tmp_path)


# ------------------------------------------------------------------------ bad input
def _error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_bad_input_is_a_user_error_and_writes_nothing(hf_dir, adapter_dir, tmp_path):
    missing = tmp_path / "nope"
    _error(convert("dtype", missing, "--out", tmp_path / "o", "--dtype", "bf16"), "does not exist")
    _error(convert("hf-to-checkpoint", missing, "--out", tmp_path / "o"), "does not exist")
    _error(convert("merge-lora", missing, "--out", tmp_path / "o"), "does not exist")
    _error(convert("checkpoint-to-hf", missing, "--out", tmp_path / "o"), "does not exist")

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    _error(convert("dtype", empty, "--out", tmp_path / "o", "--dtype", "bf16"), "no *.safetensors", str(empty))
    _error(convert("hf-to-checkpoint", empty, "--out", tmp_path / "o"), "no *.safetensors")

    _error(convert("dtype", hf_dir, "--out", tmp_path / "o", "--dtype", "int4"), "'int4'", "bf16, fp16, fp32")
    _error(convert("merge-lora", adapter_dir, "--out", tmp_path / "o", "--dtype", "fp8"), "fp8")

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    for args in (["dtype", hf_dir, "--dtype", "fp16"], ["hf-to-checkpoint", hf_dir], ["merge-lora", adapter_dir]):
        _error(convert(*args, "--out", taken), "not empty", "--out")
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]

    _error(convert("merge-lora", empty, "--out", tmp_path / "o"), "adapter_config.json", str(empty))
    no_base = tmp_path / "no_base"
    shutil.copytree(adapter_dir, no_base)
    config = json.loads((no_base / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (no_base / "adapter_config.json").write_text(json.dumps(config))
    _error(convert("merge-lora", no_base, "--out", tmp_path / "o"), "does not exist", "--base")

    assert not (tmp_path / "o").exists()
    assert_left_nothing(tmp_path)


def test_help_lists_commands_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys; from automodel_cli.commands.convert import convert_app; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "from typer.testing import CliRunner; r = CliRunner().invoke(convert_app, ['--help']); "
            "print(r.output)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in ("dtype", "merge-lora", "hf-to-checkpoint", "checkpoint-to-hf"):
        assert name in proc.stdout


def test_convert_is_mounted_on_the_real_cli(tmp_path):
    from conftest import run_cli

    listing = run_cli("convert", "--help")
    assert listing.exit_code == 0
    for command in ("dtype", "merge-lora", "hf-to-checkpoint", "checkpoint-to-hf"):
        assert command in listing.stdout
    result = run_cli("convert", "dtype", str(tmp_path / "missing"), "--out", str(tmp_path / "out"),
                     "--dtype", "bf16")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
