"""peft.method=qlora: the decoder's linear weights stored as NF4 (torchao) or int8 within their
quantization error, filled tensor by tensor from safetensors on the meta path, LoRA training
only the adapters (the loss falls), and the outputs: the adapter loads with peft on the
original base, and merged into the dequantized base it computes what the trained model does."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("torchao")

from model_dirs import save_sharded_model  # noqa: E402
from tolerances import assert_close_f32, decoder_rounding  # noqa: E402

from automodel_cli.components.peft import quantize  # noqa: E402
from automodel_cli.components.peft.lora import apply_peft  # noqa: E402

RANK = 4
# Every decoder linear weight holds whole NF4 blocks (64 values); the head and embeddings stay.
ARCHITECTURE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=64)
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down
INPUTS = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
#: float32 rounding of the tiny Llama's logits with a rank-4 adapter merged into its weights.
MERGED = decoder_rounding(layers=2, hidden=64, intermediate=96, positions=12, merged_rank=RANK)
#: The widest gap between neighbouring NF4 levels (-1.0 -> -0.6962): rounding to the nearest level
#: is off by at most half of it, in units of the block's absmax.
NF4_HALF_GAP = (1.0 - 0.6962) / 2


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**ARCHITECTURE, max_position_embeddings=32, use_cache=False))


def peft_cfg(**overrides):
    values = dict(method="qlora", quantization="nf4", rank=RANK, alpha=8, dropout=0.0, target_modules="all-linear",
                  moe_experts=None, moe_router=False)
    return SimpleNamespace(**{**values, **overrides})


def linear_weights(model) -> dict[str, torch.Tensor]:
    return {name: module.weight.detach().clone() for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and ".layers." in name}


def quantized_layers(model) -> dict[str, quantize.QuantizedLinear]:
    return {name.replace(".base_layer", ""): module for name, module in model.named_modules()
            if isinstance(module, quantize.QuantizedLinear)}


def test_nf4_weights_are_within_each_blocks_quantization_error():
    model = tiny_llama()
    originals = linear_weights(model)
    assert quantize.quantize_decoder(model, "nf4") == 2 * LINEARS_PER_LAYER
    layers = quantized_layers(model)
    assert set(layers) == set(originals)
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.embed_tokens) is torch.nn.Embedding
    for name, layer in layers.items():
        assert type(layer.weight).__name__ == "NF4Tensor", name
        original = originals[name].flatten().view(-1, quantize.NF4_BLOCK)
        error = (quantize.dequantize(layer.weight, None, torch.float32).flatten().view(-1, quantize.NF4_BLOCK)
                 - original).abs()
        absmax = original.abs().amax(dim=1, keepdim=True)
        # the block scales are themselves int8 (around their mean): off by 1/256 of their spread
        scale_error = (absmax - absmax.mean()).abs().max() / 256
        bound = NF4_HALF_GAP * absmax + scale_error + 4 * torch.finfo(torch.float32).eps * absmax
        assert (error <= bound).all(), (name, float((error - bound).max()))
        assert error.max() > 0  # quantized, not the original


def test_int8_weights_are_within_half_a_step_of_each_row():
    model = tiny_llama()
    originals = linear_weights(model)
    quantize.quantize_decoder(model, "int8")
    for name, layer in quantized_layers(model).items():
        assert layer.weight.dtype == torch.int8
        step = originals[name].abs().amax(dim=1, keepdim=True) / 127
        error = (quantize.dequantize(layer.weight, layer.weight_scale, torch.float32) - originals[name]).abs()
        assert (error <= step / 2 * (1 + 1e-5)).all(), name


@pytest.mark.parametrize("method", quantize.METHODS)
def test_the_backward_pass_keeps_the_quantized_weight_not_a_full_precision_copy(method):
    """Autograd saves the stored (NF4 or int8) weight for the backward pass; a float32 tensor the
    size of the weight saved there would cost more than the unquantized LoRA run. The input's
    gradient is the dequantized weight's."""
    layer = torch.nn.Linear(128, 64, bias=False)
    quantized = quantize.QuantizedLinear(layer, method)
    quantized.store(layer.weight.detach())
    x = torch.randn(3, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = quantized(x)
    full_precision = [t for t in saved if type(t) is torch.Tensor and t.dtype == torch.float32
                      and t.numel() >= layer.weight.numel()]
    assert not full_precision, [tuple(t.shape) for t in full_precision]
    out.sum().backward()
    weight = quantize.dequantize(quantized.weight, quantized.weight_scale, torch.float32)
    expected = torch.ones(3, 64) @ weight
    assert_close_f32(x.grad, expected, terms=64)


@pytest.mark.parametrize("method", quantize.METHODS)
def test_only_the_adapters_train_and_the_loss_falls(method):
    model = tiny_llama()
    quantize.quantize_decoder(model, method)
    model = apply_peft(model, peft_cfg(quantization=method))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(input_ids=INPUTS, labels=INPUTS).loss
        loss.backward()
        assert all((p.grad is not None) == (name in trainable) for name, p in model.named_parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_the_meta_build_quantizes_each_weight_as_it_is_read(tmp_path):
    from automodel_cli.config.resolve import defaults_layer, layer_from_overrides, resolve
    from automodel_cli.training.model_setup import build_model
    from transformers import AutoModelForCausalLM

    directory = save_sharded_model(tmp_path / "model", shards=2, **ARCHITECTURE)
    cfg = resolve([defaults_layer(), layer_from_overrides([f"model.path={directory}", "peft.method=qlora"])])
    said = []
    model = build_model(cfg, cfg.model, precision=SimpleNamespace(device=torch.device("cpu"), autocast_dtype=None),
                        mesh=None, shape=SimpleNamespace(tp=1), registries=None, sequence_parallel=False,
                        dtype=torch.float32, trainable=True, say=said.append)
    reference = AutoModelForCausalLM.from_pretrained(directory)
    layers = quantized_layers(model)
    assert len(layers) == 2 * LINEARS_PER_LAYER
    for name, layer in layers.items():
        name = name.removeprefix("base_model.model.")
        expected = quantize.round_trip(reference.get_submodule(name).weight.detach(), "nf4")
        assert torch.equal(quantize.dequantize(layer.weight, None, torch.float32), expected), name
    assert any("read shard by shard" in line for line in said), said
    assert any(line.startswith("qlora: 14 decoder linear layers") for line in said), said


def test_finetune_writes_an_adapter_for_the_original_base_and_merges_into_the_dequantized_one(cli, tmp_path):
    """Through the CLI on one process: final/ loads with peft on the unquantized base, and
    ``convert merge-lora`` gives the model the run trained (quantized base + adapter)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = save_sharded_model(tmp_path / "base", shards=1, **ARCHITECTURE)
    run = tmp_path / "run"
    result = cli("finetune", "demo", f"model.path={base}", "model.from_scratch=false", "--peft", "qlora", "-o", str(run),
                 "train.max_steps=2", "train.global_batch_size=4", "train.micro_batch_size=4", f"peft.rank={RANK}",
                 "optim.lr=0.05", "peft.merge=true", "train.eval_every_steps=null", "data.eval_split=null",
                 "logging.progress=false")
    assert result.exit_code == 0, result.stderr
    final = run / "final"
    assert quantize.recorded_method(final) == "nf4"

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final)  # the original base
    adapters = {n: p for n, p in loaded.named_parameters() if "lora_B" in n}
    assert len(adapters) == 2 * LINEARS_PER_LAYER and any(p.abs().max() > 0 for p in adapters.values())

    dequantized = AutoModelForCausalLM.from_pretrained(base)
    quantize.dequantize_base(dequantized, "nf4")
    trained = PeftModel.from_pretrained(dequantized, final).eval()
    merged_dir = tmp_path / "merged"
    result = cli("convert", "merge-lora", str(final), "--out", str(merged_dir))
    assert result.exit_code == 0, result.stderr
    assert "nf4" in result.stdout and not (merged_dir / quantize.RECORD).exists()
    with torch.no_grad():
        expected = trained(input_ids=INPUTS).logits
        for directory in (merged_dir, final / "merged"):  # convert merge-lora, peft.merge=true
            merged = AutoModelForCausalLM.from_pretrained(directory).eval()
            assert_close_f32(merged(input_ids=INPUTS).logits, expected, **MERGED)
        original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final).eval()
        assert not torch.allclose(original(input_ids=INPUTS).logits, trained(input_ids=INPUTS).logits, atol=1e-4)


def test_qlora_with_tensor_parallelism_is_refused_before_launch(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOMODEL_STATE_DIR", str(tmp_path / "state"))
    result = cli("finetune", "demo", "--peft", "qlora", "--nproc-per-node", "2", "distributed.tp=2", "-o", "runs/x")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert "peft.method=qlora cannot be combined with distributed.tp=2" in " ".join(result.stderr.split())
    assert not Path("runs").exists()


def test_nf4_scale_blocks_stay_inside_rows_so_weights_shard_on_any_process_count():
    """Where rows hold whole NF4 blocks, a scale block never spans two rows: every even row split
    holds whole scale blocks, and the weight quantizes alike on one process and on several."""
    assert quantize.scaler_block((4096, 4096)) == 64  # 64 blocks per row
    assert quantize.scaler_block((128, 14336)) == 32  # 224 blocks per row
    for shards in (1, 2, 4, 8):
        assert quantize.shardable((128, 4096), "nf4", shards)
    assert not quantize.shardable((6, 4096), "nf4", 4)  # rows do not divide: no padding of NF4
    # 96 columns: blocks span rows, so the scale block (32 of 96 blocks) decides
    assert quantize.scaler_block((64, 96)) == 32
    assert quantize.shardable((64, 96), "nf4", 1) and not quantize.shardable((64, 96), "nf4", 2)
    assert quantize.shardable((64, 96), "int8", 2)
    # the demo's down projection: 704 blocks in 11 scale blocks of 64, which no even split keeps whole
    assert quantize.shardable((128, 352), "nf4", 1) and not quantize.shardable((128, 352), "nf4", 2)
    stored = quantize.quantize(torch.randn(128, 4096), "nf4")[0]
    assert [piece.shape[0] for piece in torch.chunk(stored, 8, dim=0)] == [16] * 8


@pytest.mark.slow
def test_a_resumed_qlora_run_repeats_the_uninterrupted_one(cli, tmp_path):
    """Checkpoints hold the adapters and their optimizer state; the quantized base is rebuilt
    from the model's files, bit for bit: steps 3 and 4 after a resume equal the straight run's."""
    fast = ["--peft", "qlora", "train.max_steps=4", "train.eval_every_steps=null", "data.eval_split=null",
            "logging.progress=false"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert cli("finetune", "demo", "-o", str(straight), "checkpoint.every_steps=2", *fast).exit_code == 0
    result = cli("finetune", "demo", "-o", str(resumed), *fast,
                 f"checkpoint.resume={straight / 'checkpoints' / 'step_00000002'}")
    assert result.exit_code == 0, result.stderr

    def losses(run: Path) -> dict[int, float]:
        import json

        return {row["step"]: row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "loss" in row}

    assert losses(resumed) == {step: loss for step, loss in losses(straight).items() if step > 2}




def test_nf4_without_torchao_is_refused_before_anything_is_written(cli, tmp_path, monkeypatch):
    """``None`` in ``sys.modules`` makes Python refuse to import torchao and its modules, as on a
    machine without it."""
    import sys

    from conftest import one_line, tree_digest

    for name in [name for name in sys.modules if name == "torchao" or name.startswith("torchao.")] + ["torchao"]:
        monkeypatch.setitem(sys.modules, name, None)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("an earlier run's file")
    before = tree_digest(tmp_path)
    result = cli("finetune", "demo", "--peft", "qlora", "-o", str(run_dir), "train.max_steps=1")
    message = one_line(result.stderr)
    assert result.exit_code == 2 and "Traceback" not in message
    assert "needs the torchao package" in message and "pip install 'automodel-cli[qlora]'" in message
    assert tree_digest(tmp_path) == before
@pytest.mark.slow
@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_qlora_composes_with_packing_the_fused_loss_and_activation_checkpointing(cli, tmp_path, method):
    """The fused ``linear_ce`` loss and recomputed activations change how the numbers are
    computed, not what: the same packed QLoRA run gives the plain run's losses to float32
    rounding, and they fall."""
    import json

    common = ["--peft", "qlora", f"peft.quantization={method}", "data.packing=true", "data.max_length=128",
              "train.max_steps=8", "train.eval_every_steps=null", "data.eval_split=null", "logging.progress=false"]
    plain, fused = tmp_path / "plain", tmp_path / "fused"
    assert cli("finetune", "demo", "-o", str(plain), *common).exit_code == 0
    result = cli("finetune", "demo", "-o", str(fused), *common, "loss.name=linear_ce",
                 "train.activation_checkpointing=full")
    assert result.exit_code == 0, result.stderr

    def losses(run: Path) -> list[float]:
        return [row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]

    expected, got = losses(plain), losses(fused)
    assert got == pytest.approx(expected, rel=1e-4) and len(got) == 8
    assert got[-1] < got[0]
