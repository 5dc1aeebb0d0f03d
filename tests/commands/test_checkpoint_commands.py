"""`automodel checkpoint consolidate|inspect` on real checkpoints, checked with real
``from_pretrained`` / ``PeftModel.from_pretrained`` loads."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from automodel_cli.assets import demo_dir
from tolerances import assert_close_f32, decoder_rounding


@pytest.fixture
def automodel(cli):
    """The real ``automodel`` entry point, in-process (see tests/conftest.py)."""
    return lambda *args: cli(*[str(a) for a in args])
from automodel_cli.components.checkpoint import save_checkpoint

INPUTS = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
#: float32 rounding of the demo model's logits on INPUTS (tests/tolerances.py): the same weights in
#: another model object may be laid out (aligned) differently, which BLAS may sum in another order;
#: and with a rank-4 adapter merged into the weights.
FORWARD = decoder_rounding(layers=2, hidden=128, intermediate=352, positions=12)
MERGED = decoder_rounding(layers=2, hidden=128, intermediate=352, positions=12, merged_rank=4)


def demo_model(seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(demo_dir())
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def demo_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_dir())


def train_a_bit(model, steps: int = 2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=INPUTS, labels=INPUTS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


@torch.no_grad()
def logits(model) -> torch.Tensor:
    model.eval()
    return model(input_ids=INPUTS).logits.float()


def safetensors_keys(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def save(model, run_dir, step=3, optimizer=None, **kwargs):
    return save_checkpoint(run_dir, step, model=model, optimizer=optimizer, scheduler=None,
                           train_state={"epoch": 1}, keep=2, **kwargs)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A full fine-tune of the tied-embedding demo model with a tokenizer stored in the checkpoint."""
    run_dir = tmp_path_factory.mktemp("full") / "run"
    model = demo_model()
    optimizer = train_a_bit(model)
    save(model, run_dir, step=2, optimizer=optimizer, tokenizer=demo_tokenizer())
    train_a_bit(model, 1)
    save(model, run_dir, step=3, optimizer=optimizer, tokenizer=demo_tokenizer())
    return run_dir, logits(model)


def test_consolidate_full_model_loads_with_from_pretrained(automodel, full_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, expected = full_run
    out = tmp_path / "hf"
    result = automodel("checkpoint", "consolidate", run_dir, "--out", out)  # a run dir: latest
    assert result.exit_code == 0, result.stderr
    assert "from step 3" in result.stdout and "tokenizer: checkpoint hf/" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json"]
    keys = safetensors_keys(out / "model.safetensors")
    assert "lm_head.weight" not in keys  # tied, as save_pretrained writes it
    assert set(keys.values()) == {"F32"} and len(keys) == 1 + 2 * 9 + 1
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_close_f32(logits(model), expected, **FORWARD)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("hello world")["input_ids"] == demo_tokenizer()("hello world")["input_ids"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_consolidate_bf16_and_sharded(automodel, full_run, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir, expected = full_run
    out = tmp_path / "bf16"
    result = automodel("checkpoint", "consolidate", run_dir / "checkpoints" / "step_00000003", "--out", out,
                       "--dtype", "bf16", "--max-shard-size", "40KB")
    assert result.exit_code == 0, result.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    dtypes = {}
    for file in files:
        assert (out / file).stat().st_size <= 40_000 + 4096 or len(safetensors_keys(out / file)) == 1
        dtypes.update(safetensors_keys(out / file))
    assert set(dtypes) == set(index["weight_map"]) and set(dtypes.values()) == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    torch.testing.assert_close(logits(model), expected, rtol=0.05, atol=0.05)  # bf16 weights: 2**-8 each


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_checkpoint_to_adapter_and_merged_model(automodel, tmp_path, method):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    base = demo_model(seed=1)
    if method == "lora":  # base found through the run's config.yaml (model.path)
        base_dir = tmp_path / "base"
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text(f"model:\n  path: {base_dir}\n")
    else:  # trained from scratch: the recipe keeps the base beside the run
        base_dir = run_dir / "base_model"
    base.save_pretrained(base_dir)
    demo_tokenizer().save_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", use_dora=method == "dora")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    optimizer = train_a_bit(model, 3)
    save(model, run_dir, optimizer=optimizer)
    expected = logits(model)

    adapter = tmp_path / "adapter"
    result = automodel("checkpoint", "consolidate", run_dir, "--out", adapter)
    assert result.exit_code == 0, result.stderr
    assert "peft adapter" in result.stdout
    # Same keys as peft's own save_pretrained writes.
    model.save_pretrained(tmp_path / "peft_own")
    assert safetensors_keys(adapter / "adapter_model.safetensors").keys() == \
        safetensors_keys(tmp_path / "peft_own" / "adapter_model.safetensors").keys()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
    assert_close_f32(logits(loaded), expected, **FORWARD)
    if method == "dora":  # from scratch: the adapter points at the run's base_model/
        assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == \
            str(base_dir.resolve())

    merged = tmp_path / "merged"
    result = automodel("checkpoint", "consolidate", run_dir, "--out", merged, "--merge-lora")
    assert result.exit_code == 0, result.stderr
    assert "merged model" in result.stdout and "base:" in result.stdout
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in k for k in safetensors_keys(merged / "model.safetensors"))
    assert_close_f32(logits(plain), expected, **MERGED)
    # Control: the adapter changed the model, so the comparison above can fail.
    assert not torch.allclose(logits(AutoModelForCausalLM.from_pretrained(base_dir)), expected, atol=1e-3)


def test_inspect_human_and_json(automodel, full_run):
    run_dir, _ = full_run
    result = automodel("checkpoint", "inspect", run_dir, "--json", "--verify")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["step"] == 3 and info["world_size"] == 1 and info["mesh"] is None
    assert info["train_state"] == {"epoch": 1, "step": 3}
    assert info["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    tensors = {t["name"]: t for t in info["tensors"]}
    assert tensors["model.embed_tokens.weight"] == {
        "name": "model.embed_tokens.weight", "dtype": "float32", "shape": [64, 128], "numel": 8192,
        "bytes": 32768, "shards": 1}
    assert info["model_bytes"] == sum(t["bytes"] for t in info["tensors"])
    assert info["optimizer"]["tensors"] == 3 * len(tensors) and info["verified"] is True
    assert "tokenizer.json" in info["hf_files"]

    text = automodel("checkpoint", "inspect", run_dir / "checkpoints" / "step_00000002").stdout
    assert "step         2" in text and "world size   1" in text
    assert "model.embed_tokens.weight" in text and "64x128" in text and "32.0 KiB" in text
    assert f"total: {len(tensors)} tensors" in text


# ------------------------------------------------------------------------------ errors
def assert_user_error(result, *fragments):
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_not_a_checkpoint(automodel, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for command in ("inspect", "consolidate"):
        extra = ["--out", tmp_path / "o"] if command == "consolidate" else []
        assert_user_error(automodel("checkpoint", command, tmp_path / "empty", *extra),
                          str(tmp_path / "empty"), "not a checkpoint")
        assert_user_error(automodel("checkpoint", command, tmp_path / "file.txt", *extra), "file.txt")
        assert_user_error(automodel("checkpoint", command, tmp_path / "missing", *extra),
                          "missing does not exist")
    assert not (tmp_path / "o").exists()


@pytest.fixture
def small_run(tmp_path):
    run_dir = tmp_path / "run"
    save(demo_model(), run_dir)
    return run_dir, run_dir / "checkpoints" / "step_00000003"


@pytest.mark.parametrize("verify", ["--verify", "--no-verify"])
def test_truncated_shard_is_named(automodel, small_run, tmp_path, verify):
    run_dir, checkpoint = small_run
    shard = checkpoint / "model" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    result = automodel("checkpoint", "consolidate", run_dir, "--out", tmp_path / "o", verify)
    assert_user_error(result, "model/__0_0.distcp", "truncated")
    assert not (tmp_path / "o").exists()


def test_corrupted_index_is_named(automodel, small_run, tmp_path):
    _, checkpoint = small_run
    (checkpoint / "model" / ".metadata").write_bytes(b"\x80\x04garbage")
    for args in (["inspect", checkpoint], ["consolidate", checkpoint, "--out", tmp_path / "o", "--no-verify"]):
        assert_user_error(automodel("checkpoint", *args), "model/.metadata", "corrupted")


def test_existing_output_is_never_overwritten(automodel, small_run, tmp_path):
    run_dir, _ = small_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert_user_error(automodel("checkpoint", "consolidate", run_dir, "--out", out), str(out), "not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    (tmp_path / "a-file").write_text("x")
    assert_user_error(automodel("checkpoint", "consolidate", run_dir, "--out", tmp_path / "a-file"), "a-file")
    # An existing *empty* directory is fine (it is replaced by the finished output).
    (tmp_path / "empty").mkdir()
    assert automodel("checkpoint", "consolidate", run_dir, "--out", tmp_path / "empty").exit_code == 0
    assert (tmp_path / "empty" / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_merge_without_base_weights_and_bad_options(automodel, tmp_path):
    from peft import LoraConfig, get_peft_model

    run_dir = tmp_path / "run"
    model = get_peft_model(demo_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    save(model, run_dir)
    assert_user_error(automodel("checkpoint", "consolidate", run_dir, "--out", tmp_path / "m", "--merge-lora"),
                      "base weights", "--base-model")
    assert_user_error(automodel("checkpoint", "consolidate", run_dir, "--out", tmp_path / "m", "--merge-lora",
                                "--base-model", tmp_path / "nowhere"), "nowhere")
    assert_user_error(automodel("checkpoint", "consolidate", run_dir, "--out", tmp_path / "m", "--dtype", "int3"),
                      "--dtype")
    assert_user_error(automodel("checkpoint", "consolidate", run_dir, "--out", tmp_path / "m",
                                "--max-shard-size", "lots"), "--max-shard-size")
    assert not (tmp_path / "m").exists()


def test_command_module_does_not_import_torch():
    code = "import sys, automodel_cli.commands.checkpoint; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ------------------------------------------------------------------------------ memory
MEMORY_CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    from automodel_cli.components.checkpoint.consolidate import consolidate
    import automodel_cli.components.checkpoint.dcp_io, safetensors.torch, transformers  # noqa
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    consolidate(sys.argv[1], sys.argv[2])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kib": before, "after_kib": after}))
""")


def test_consolidate_memory_stays_near_the_largest_tensor(tmp_path):
    """8 tensors of 8 MiB: streaming needs about one or two of them, not all 64 MiB."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=1024, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=2048, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p)
    total = sum(p.numel() * 4 for p in model.parameters())
    largest = max(p.numel() * 4 for p in model.parameters())
    save(model, tmp_path / "run")
    del model
    script = tmp_path / "child.py"
    script.write_text(MEMORY_CHILD)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    usage = json.loads(proc.stdout.strip().splitlines()[-1])
    grown = (usage["after_kib"] - usage["before_kib"]) * 1024
    assert (tmp_path / "out" / "model.safetensors").stat().st_size > total
    assert grown < 3 * largest and grown < total / 2, f"peak grew by {grown / 2**20:.1f} MiB, total {total / 2**20:.0f} MiB"


@pytest.mark.parametrize("command", [["inspect"], ["consolidate", "--out", "exported"]])
def test_a_run_without_checkpoints_is_explained(automodel, tmp_path, command):
    run = tmp_path / "run"
    assert automodel("finetune", "demo", "-o", run, "train.max_steps=1", "train.eval_every_steps=null",
                     "data.eval_split=null", "logging.progress=false").exit_code == 0
    args = [a if a != "exported" else tmp_path / "exported" for a in command]
    result = automodel("checkpoint", args[0], run, *args[1:])
    assert result.exit_code == 2
    assert "is a run directory without checkpoints" in result.stderr
    assert f"model.path={run / 'final'}" in result.stderr and "checkpoint.every_steps=N" in result.stderr
    assert not (tmp_path / "exported").exists()


def test_the_run_config_is_read_for_base_weights_and_tokenizer(tmp_path):
    """consolidate falls back to the run's config.yaml (model.path, model.tokenizer) when a
    checkpoint carries no hf/ folder: it must read it, and an unreadable one counts as absent."""
    from automodel_cli.components.checkpoint.consolidate import run_config
    from automodel_cli.run_layout import RunDir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert run_config(run_dir) == {}
    RunDir(run_dir).config.write_text("model:\n  path: /models/base\n  tokenizer: null\n")
    assert run_config(run_dir)["model"] == {"path": "/models/base", "tokenizer": None}
    RunDir(run_dir).config.write_text("model: [unclosed\n")
    assert run_config(run_dir) == {}
