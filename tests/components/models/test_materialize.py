"""Building a model on the meta device and filling it from safetensors slices or seeded init.

One process here (the same path as many, with a single shard): the model built this way equals
``from_pretrained``'s bit for bit (logits, buffers, tied weights, per-tensor dtype cast), a random
start is the same for the same seed and the model's own initialisation in distribution, and
adapters start as peft's do (the LoRA'd model computes the base model's logits; DoRA magnitudes
are the base weight's row norms). The multi-process side (FSDP2, TP, their mix; a random start
equal on 1, 2 and 4 processes) is tested through real runs in tests/recipes/test_sharded_loading.py
and tests/recipes/test_finetune_distributed.py (the demo trains from a random start).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from model_dirs import save_sharded_model

from automodel_cli.components.models import materialize as meta
from automodel_cli.config.resolve import defaults_layer, layer_from_overrides, resolve
from automodel_cli.training.model_setup import build_model

ARCHITECTURE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16)
CPU = SimpleNamespace(device=torch.device("cpu"), autocast_dtype=None)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A tied-embedding model in three safetensors files with an index."""
    directory = save_sharded_model(tmp_path_factory.mktemp("m") / "model", shards=3, **ARCHITECTURE)
    assert (directory / "model.safetensors.index.json").is_file()
    return directory


def build(path: Path, *overrides: str, dtype: torch.dtype = torch.float32, say=lambda _: None) -> torch.nn.Module:
    cfg = resolve([defaults_layer(), layer_from_overrides([f"model.path={path}", *overrides])])
    return build_model(cfg, cfg.model, precision=CPU, mesh=None, shape=SimpleNamespace(tp=1), registries=None,
                       sequence_parallel=False, dtype=dtype, trainable=True, say=say)


def pretrained(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def logits(model: torch.nn.Module) -> torch.Tensor:
    tokens = torch.tensor([[1, 5, 9, 12, 40, 7, 3, 2], [4, 4, 8, 16, 23, 42, 0, 1]])
    with torch.no_grad():
        return model.eval()(tokens).logits


def test_loading_shards_equals_from_pretrained_bit_for_bit(sharded):
    said = []
    model, reference = build(sharded, say=said.append), pretrained(sharded)
    assert torch.equal(logits(model), logits(reference))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied weights stay one parameter
    assert torch.equal(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert any("read shard by shard from 3 safetensors files" in line for line in said), said


def test_dtype_is_converted_tensor_by_tensor(sharded):
    model, reference = build(sharded, dtype=torch.bfloat16), pretrained(sharded, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for (name, mine), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(mine, theirs), name


def test_the_old_path_still_loads_the_same_model(sharded):
    said = []
    model = build(sharded, "model.meta_init=false", say=said.append)
    assert torch.equal(logits(model), logits(pretrained(sharded)))
    assert any("loaded whole" in line for line in said), said


def test_random_start_is_seeded_per_parameter(sharded):
    first = build(sharded, "model.from_scratch=true", "train.seed=7")
    again = build(sharded, "model.from_scratch=true", "train.seed=7")
    other = build(sharded, "model.from_scratch=true", "train.seed=8")
    for (name, a), b, c in zip(first.state_dict().items(), again.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b), name
        if "norm" not in name:  # RMSNorm weights start at one whatever the seed
            assert not torch.equal(a, c), name
    # The model's own initialisation: N(0, initializer_range) weights, unit norms, and every
    # layer's weights drawn independently (seeded by name, not one seed reused).
    std = first.config.initializer_range
    up = first.model.layers[0].mlp.up_proj.weight
    assert abs(up.std().item() - std) < 0.1 * std
    assert torch.equal(first.model.norm.weight, torch.ones_like(first.model.norm.weight))
    assert not torch.equal(up, first.model.layers[1].mlp.up_proj.weight)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapters_start_as_the_base_model(sharded, method):
    model = build(sharded, f"peft.method={method}")
    base = pretrained(sharded)
    assert torch.allclose(logits(model), logits(base), rtol=0, atol=1e-5 * logits(base).abs().max().item())
    names = {name for name, _ in model.named_parameters() if meta.is_adapter(name)}
    assert any(".lora_A." in name for name in names) and any(".lora_B." in name for name in names)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    a = layer.lora_A["default"].weight
    bound = 1 / a.shape[1] ** 0.5  # Kaiming-uniform with a=sqrt(5), as peft initialises A
    assert a.abs().max() <= bound and a.std() > bound / 3
    if method == "dora":
        magnitude = layer.lora_magnitude_vector["default"].weight
        torch.testing.assert_close(magnitude, torch.linalg.norm(layer.base_layer.weight, dim=1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name, key", [
    ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
    ("model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"),
    ("base_model.model.model.layers.1.self_attn.v_proj.base_layer.weight", "model.layers.1.self_attn.v_proj.weight"),
    ("_orig_mod.lm_head.weight", "lm_head.weight"),
    ("base_model.model.model.layers.0.mlp.experts.base_layer.base_layer.gate_up_proj",  # nested parameter adapters
     "model.layers.0.mlp.experts.gate_up_proj"),
])
def test_checkpoint_keys_of_wrapped_parameters(name, key):
    assert meta.checkpoint_key(name) == key


def test_key_mapping_allows_for_the_base_model_prefix():
    expected = ["model.embed_tokens.weight", "lm_head.weight"]
    assert meta.key_mapping(expected, {"embed_tokens.weight", "lm_head.weight"}, "model") == {
        "model.embed_tokens.weight": "embed_tokens.weight", "lm_head.weight": "lm_head.weight"}
    assert meta.key_mapping(expected, {"model.embed_tokens.weight"}, "model") is None


def test_name_seeds_differ_by_name_and_seed():
    seeds = {meta.name_seed(seed, name) for seed in (1, 2) for name in ("a.weight", "b.weight")}
    assert len(seeds) == 4
    assert meta.name_seed(1, "a.weight") == meta.name_seed(1, "a.weight")


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_experts_are_read_from_their_per_expert_tensors(tmp_path, kind):
    """Hub checkpoints keep one tensor per expert and projection; the model stacks them (and
    joins gate and up). The shard path reads them without the whole-model fallback, and any
    slice of a stacked tensor is read from just the experts and rows it covers."""
    from moe_models import save_moe_model

    from automodel_cli.components.models.joined import joined_layout

    directory = save_moe_model(tmp_path / kind, kind)
    said = []
    model, reference = build(directory, say=said.append), pretrained(directory)
    expected = dict(reference.named_parameters())
    for name, param in model.named_parameters():  # bit for bit (the forwards differ: ours is grouped)
        assert torch.equal(param, expected[name]), name
    assert any("read shard by shard" in line for line in said) and not any("whole" in line for line in said), said

    reader = meta.CheckpointReader(sorted(directory.glob("*.safetensors")))
    for name, param in reference.named_parameters():
        if param.dim() != 3:
            continue
        layout = joined_layout(reference, name, tuple(param.shape))
        assert layout is not None and layout.experts == param.shape[0]
        for offset, shape in [((0, 0, 0), tuple(param.shape)), ((3, 5, 7), (2, param.shape[1] - 9, 20)),
                              ((7, param.shape[1] // 2 - 3, 0), (1, 6, param.shape[2]))]:
            expected = param.detach()[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
            assert torch.equal(layout.read(reader, offset, shape), expected), (name, offset, shape)
    reader.close()
