"""train.precision=fp8: which layers become torchao Float8Linear, the float8 math they compute
(torchao emulates it on CPU), the model built on the meta device and filled from safetensors
with them, and the refusal on a machine without a float8 GPU (exit 2, nothing written)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("torchao")

from conftest import one_line, run_cli, tree_digest  # noqa: E402
from model_dirs import save_sharded_model  # noqa: E402

from automodel_cli.components.training import float8  # noqa: E402
from automodel_cli.config.resolve import defaults_layer, layer_from_overrides, resolve  # noqa: E402
from automodel_cli.training.model_setup import build_model  # noqa: E402

# Attention projections 64 -> 64 and 64 -> 32 convert; the MLP's 64 <-> 40 does not (40 is not a
# multiple of 16).
ARCHITECTURE = dict(hidden_size=64, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=64)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def float8_linear():
    return float8.import_float8().float8_linear.Float8Linear


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**ARCHITECTURE, max_position_embeddings=32, use_cache=False))


def assert_decoder_attention_converted(model, layers: int = 2):
    Float8Linear = float8_linear()
    converted = [name for name, module in model.named_modules() if isinstance(module, Float8Linear)]
    assert len(converted) == layers * len(ATTENTION), converted
    assert all(any(name.endswith(f"self_attn.{proj}") or name.endswith(f"self_attn.{proj}.base_layer")
                   for proj in ATTENTION) for name in converted), converted
    kept = [name for name, module in model.named_modules() if type(module) is torch.nn.Linear
            and (any(f".{proj}" in name for proj in MLP) or name.endswith("lm_head"))]
    assert {name.split(".mlp.")[-1].split(".")[0] for name in kept if ".mlp." in name} == set(MLP)
    assert any(name.endswith("lm_head") for name in kept)
    assert all(type(module) is torch.nn.Embedding for name, module in model.named_modules()
               if name.endswith("embed_tokens"))


@pytest.mark.parametrize("recipe", float8.RECIPES)
def test_only_decoder_linears_with_dims_of_16_convert(recipe):
    model = tiny_llama()
    assert float8.convert(model, recipe, sharded=False) == 2 * len(ATTENTION)
    assert_decoder_attention_converted(model)
    ids = torch.arange(24).reshape(2, 12) % 64
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("recipe", float8.RECIPES)
def test_a_float8_layer_computes_within_float8_rounding(recipe):
    """e4m3 keeps 3 mantissa bits: each factor of every product is off by at most 2^-4 of itself
    (scaled to the range, rounded to nearest), so |y8 - y| <= (2^-4 + 2^-4 + 2^-8) |x| @ |w|^T."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48, bias=False))
    x = torch.randn(16, 32)
    exact = model(x).detach()
    bound = (x.abs() @ model[0].weight.detach().abs().T) * (2 ** -3 + 2 ** -8)
    float8.import_float8().convert_to_float8_training(model, config=float8.linear_config(recipe, sharded=False))
    assert isinstance(model[0], float8_linear())
    got = model(x).detach()
    assert not torch.equal(got, exact)  # float8, not the float32 product
    assert ((got - exact).abs() <= bound).all()


def test_lora_adapters_stay_and_their_base_layers_convert():
    import peft

    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=16, target_modules="all-linear"))
    float8.convert(model, "tensorwise", sharded=False)
    assert_decoder_attention_converted(model)
    Float8Linear = float8_linear()
    adapters = [m for n, m in model.named_modules() if ".lora_A." in f"{n}." or ".lora_B." in f"{n}."]
    assert adapters and not any(isinstance(m, Float8Linear) for m in adapters)
    ids = torch.arange(24).reshape(2, 12) % 64
    model(input_ids=ids, labels=ids).loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def test_the_meta_build_converts_and_fills_float8_layers_from_safetensors(tmp_path):
    from transformers import AutoModelForCausalLM

    directory = save_sharded_model(tmp_path / "model", shards=2, **ARCHITECTURE)
    said = []
    cfg = resolve([defaults_layer(), layer_from_overrides([f"model.path={directory}", "train.precision=fp8"])])
    model = build_model(cfg, cfg.model, precision=SimpleNamespace(device=torch.device("cpu"), autocast_dtype=None),
                        mesh=None, shape=SimpleNamespace(tp=1), registries=None, sequence_parallel=False,
                        dtype=torch.float32, trainable=True, say=said.append)
    assert_decoder_attention_converted(model)
    reference = AutoModelForCausalLM.from_pretrained(directory)
    mine = dict(model.named_parameters())
    for name, param in reference.named_parameters():  # the same names and values: checkpoints are unchanged
        assert torch.equal(mine[name].detach(), param.detach()), name
    assert any(line.startswith("fp8: 8 decoder linear layers") for line in said), said


def test_requirement_problems_name_the_gpu_and_the_package():
    assert "this run is on cpu" in float8.requirement_problem("cpu", None, True)
    assert "compute capability 8.0" in float8.requirement_problem("cuda", (8, 0), True)
    assert "not installed" in float8.requirement_problem("cuda", (9, 0), False)
    assert float8.requirement_problem("cuda", (8, 9), True) is None
    assert float8.requirement_problem("cuda", (10, 0), True) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a float8 GPU")
def test_finetune_with_fp8_on_cpu_is_refused_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("an earlier run's file")
    before = tree_digest(tmp_path)
    result = run_cli("finetune", "demo", "train.precision=fp8", f"output_dir={run_dir}", cwd=tmp_path)
    assert result.exit_code == 2, result.stderr
    message = one_line(result.stderr)
    assert "compute capability 8.9" in message and "H100" in message and "automodel-cli[fp8]" in message
    assert "Traceback" not in result.stderr
    assert tree_digest(tmp_path) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a float8 GPU")
def test_fp8_jobs_that_would_fail_are_refused_before_launch(cli, tmp_path, monkeypatch):
    """torchrun here without a float8 GPU; a cluster job without GPUs, and tensor parallelism,
    each named with the key that set it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOMODEL_STATE_DIR", str(tmp_path / "state"))
    local = cli("finetune", "demo", "--nproc-per-node", "2", "-o", "runs/x", "train.precision=fp8")
    assert local.exit_code == 2 and "command line `train.precision=fp8`" in local.stderr
    assert "this run is on cpu" in one_line(local.stderr)
    cluster = cli("finetune", "demo", "--launcher", "slurm", "--nproc-per-node", "2", "--dry-run", "-o", "runs/x",
                  "train.precision=fp8", "distributed.tp=2")
    message = one_line(cluster.stderr)
    assert cluster.exit_code == 2 and "the slurm job requests no GPUs" in message, message
    assert "command line `distributed.tp=2`: train.precision=fp8 does not combine with tensor parallelism" in message
    assert not (tmp_path / "runs").exists()
