"""Fast single-process checks of the distributed component: mesh sizes, TP validation, plan
registry and plugins, plan contents, and the world-size-1 paths."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from automodel_cli import hookimpl
from automodel_cli.components.distributed.mesh import MeshShape, dp_rank, dp_world_size, fsdp_mesh
from automodel_cli.components.distributed.plans import resolve_plan, validate_tp
from automodel_cli.plugins.families import FAMILIES

BUILTIN_MODEL_TYPES = [t for family in FAMILIES.values() for t in family.plans]
from automodel_cli.errors import UserError
from automodel_cli.plugins import parallel_plans
from automodel_cli.registry import ParallelPlanRegistry


def builtin_registry() -> ParallelPlanRegistry:
    registry = ParallelPlanRegistry()
    parallel_plans.register_parallel_plans(registry)
    return registry


# --------------------------------------------------------------------------- MeshShape

@pytest.mark.parametrize(("args", "expected"), [
    ((1, -1, 1, 8), (1, 8, 1)),
    ((1, -1, 2, 8), (1, 4, 2)),
    ((2, -1, 2, 8), (2, 2, 2)),
    ((2, 2, 2, 8), (2, 2, 2)),
    ((1, -1, 1, 1), (1, 1, 1)),
])
def test_mesh_shape_resolves(args, expected):
    shape = MeshShape.resolve(*args)
    assert (shape.dp_replicate, shape.dp_shard, shape.tp) == expected
    assert shape.world_size == args[3]
    assert shape.dp_size == expected[0] * expected[1]


def test_mesh_shape_product_mismatch_names_all_numbers_and_the_fix():
    with pytest.raises(UserError) as info:
        MeshShape.resolve(dp_replicate=2, dp_shard=3, tp=2, world_size=8)
    message = str(info.value)
    for text in ("dp_replicate=2", "dp_shard=3", "tp=2", "12", "8", "dp_shard=-1"):
        assert text in message
    assert info.value.exit_code == 2


def test_mesh_shape_rest_must_divide():
    with pytest.raises(UserError, match=r"3 x 2 = 6 does not divide 8"):
        MeshShape.resolve(dp_replicate=3, dp_shard=-1, tp=2, world_size=8)


@pytest.mark.parametrize("bad", [dict(tp=0), dict(dp_replicate=-1), dict(dp_shard=0), dict(dp_shard=-2)])
def test_mesh_shape_rejects_non_positive(bad):
    args = dict(dp_replicate=1, dp_shard=-1, tp=1, world_size=4) | bad
    with pytest.raises(UserError, match="positive integers"):
        MeshShape.resolve(**args)


def test_single_process_mesh_helpers():
    assert dp_rank(None) == 0 and dp_world_size(None) == 1 and fsdp_mesh(None) is None


# --------------------------------------------------------------------------- validate_tp

def llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128),
                          **overrides})


def test_validate_tp_accepts_divisors():
    validate_tp(llama_config(), 1)
    validate_tp(llama_config(), 2)


def test_validate_tp_names_the_numbers():
    with pytest.raises(UserError) as info:
        validate_tp(llama_config(), 4)
    message = str(info.value)
    assert "distributed.tp=4" in message and "num_key_value_heads=2" in message
    assert "num_attention_heads=4" in message and "[1, 2]" in message


def test_validate_tp_intermediate_size():
    with pytest.raises(UserError, match="intermediate_size=130"):
        validate_tp(llama_config(intermediate_size=130, num_attention_heads=8, num_key_value_heads=4), 4)


# --------------------------------------------------------------------------- registry & plugins

def test_builtin_plans_are_listed_with_descriptions():
    registry = builtin_registry()
    assert registry.names() == sorted(BUILTIN_MODEL_TYPES)
    for entry in registry:
        assert entry.description
        assert entry.target.startswith("automodel_cli.components.distributed.plans:")
        assert callable(entry.load())


def test_missing_plan_lists_supported_types():
    with pytest.raises(UserError) as info:
        resolve_plan(builtin_registry(), "falcon", 2)
    message = str(info.value)
    assert "`falcon`" in message and "distributed.tp=2" in message
    for name in BUILTIN_MODEL_TYPES:
        assert name in message
    assert "register_parallel_plans" in message


def test_plugin_module_does_not_import_torch():
    code = ("import sys; import automodel_cli.plugins.parallel_plans as p; "
            "from automodel_cli.registry import ParallelPlanRegistry; r = ParallelPlanRegistry(); "
            "p.register_parallel_plans(r); assert 'torch' not in sys.modules, 'torch imported'; "
            "import automodel_cli.components.distributed.plans, automodel_cli.components.distributed.mesh; "
            "assert 'torch' not in sys.modules, 'torch imported by component'")
    subprocess.run([sys.executable, "-c", code], check=True)


def my_arch_plan(model, tp_mesh, sequence_parallel=False):
    return {"decoder.proj": "colwise"}


def test_third_party_plugin_registers_a_plan(automodel_plugin):
    plugin = types.SimpleNamespace(
        __name__="my_parallel_plugin",
        register_parallel_plans=hookimpl(
            lambda registry: registry.add("my_arch", f"{__name__}:my_arch_plan",
                                          description="My architecture")),
    )
    registries = automodel_plugin(plugin)
    entry = registries.parallel_plans.get("my_arch")
    assert entry.provider.plugin == "my_parallel_plugin"
    plan = resolve_plan(registries.parallel_plans, "my_arch", 2)
    assert plan is my_arch_plan
    assert plan(None, None) == {"decoder.proj": "colwise"}


# --------------------------------------------------------------------------- plan contents

class FakeMesh:
    def __init__(self, size):
        self._size = size

    def size(self, dim=None):
        return self._size


def tiny(model_type="llama", **overrides):
    import torch
    from transformers import AutoModelForCausalLM, Phi3Config, Qwen3Config

    torch.manual_seed(0)
    common = {**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128), **overrides}
    config = {"llama": lambda: llama_config(**overrides),
              "qwen3": lambda: Qwen3Config(**common, head_dim=16, tie_word_embeddings=True),
              "phi3": lambda: Phi3Config(**common, pad_token_id=0)}[model_type]()
    return AutoModelForCausalLM.from_config(config)


def test_llama_plan_shards_attention_mlp_embedding_and_head():
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from automodel_cli.components.distributed.plans import llama_plan

    plan = llama_plan(tiny(), FakeMesh(2), False)
    for i in range(2):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            assert isinstance(plan[f"model.layers.{i}.{name}"], ColwiseParallel)
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            assert isinstance(plan[f"model.layers.{i}.{name}"], RowwiseParallel)
    assert isinstance(plan["model.embed_tokens"], RowwiseParallel)
    head = plan["lm_head"]
    assert isinstance(head, ColwiseParallel) and head.output_layouts == (Replicate(),)
    sp = llama_plan(tiny(), FakeMesh(2), True)
    assert sp["model.layers.0.self_attn.o_proj"].output_layouts == (Shard(1),)
    assert "model.layers.1.input_layernorm" in sp and "model.norm" in sp


def test_vocab_not_divisible_keeps_embeddings_replicated():
    from automodel_cli.components.distributed.plans import llama_plan

    plan = llama_plan(tiny(vocab_size=127), FakeMesh(2), False)
    assert "model.embed_tokens" not in plan and "lm_head" not in plan


def test_plans_find_layers_through_peft():
    from peft import LoraConfig, get_peft_model

    from automodel_cli.components.models.structure import decoder_layers
    from automodel_cli.components.distributed.plans import qwen3_plan

    model = get_peft_model(tiny("qwen3"), LoraConfig(r=2, target_modules="all-linear"))
    plan = qwen3_plan(model, FakeMesh(2), False)
    assert "base_model.model.model.layers.1.self_attn.q_proj" in plan
    assert "base_model.model.model.layers.0.self_attn.q_norm" in plan
    assert "base_model.model.lm_head" in plan
    layers = decoder_layers(model)
    assert [type(layer).__name__ for layer in layers] == ["Qwen3DecoderLayer"] * 2


def test_phi3_plan_gathers_fused_projections():
    from torch.distributed.tensor import Replicate

    from automodel_cli.components.distributed.plans import phi3_plan

    plan = phi3_plan(tiny("phi3"), FakeMesh(2), False)
    assert plan["model.layers.0.self_attn.qkv_proj"].output_layouts == (Replicate(),)
    assert plan["model.layers.0.mlp.gate_up_proj"].output_layouts == (Replicate(),)
    assert plan["model.layers.0.mlp.down_proj"].input_layouts == (Replicate(),)


# --------------------------------------------------------------------------- one process

def test_init_distributed_without_torchrun(monkeypatch):
    from automodel_cli.components.distributed.env import init_distributed

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    env = init_distributed()
    assert (env.rank, env.world_size, env.backend, env.is_main) == (0, 1, None, True)


def test_init_distributed_needs_rendezvous_address(monkeypatch):
    from automodel_cli.components.distributed.env import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(UserError, match="MASTER_ADDR"):
        init_distributed()


def test_single_process_parallelize_clip_and_state_dict():
    import torch

    from automodel_cli.components.distributed.parallelize import (
        clip_grad_norm_,
        gather_full_state_dict,
        parallelize_model,
    )
    from tolerances import assert_close_f32, decoder_rounding, f32_tol

    model = tiny()
    reference = tiny()
    model = parallelize_model(model, None, tp=1, activation_checkpointing=True, mixed_precision=False)
    model.train()
    reference.train()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    for m in (model, reference):
        m(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    ours = clip_grad_norm_(model.parameters(), 0.5)
    theirs = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    # float32 rounding of the gradients (activation checkpointing recomputes the forward), then
    # of the norm's square, sum and square root over the same values (tests/tolerances.py)
    rounding = decoder_rounding(layers=2, hidden=64, intermediate=128, positions=8, vocab=128, tokens=16,
                                gradients=True)
    rtol, atol = f32_tol(float(theirs), terms=rounding["terms"], depth=rounding["depth"] + 3)
    assert ours == pytest.approx(float(theirs), rel=rtol, abs=atol)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert_close_f32(a.grad, b.grad, **rounding)
    state = gather_full_state_dict(model)
    assert set(state) == set(reference.state_dict()) and all(t.device.type == "cpu" for t in state.values())


def test_parallelize_model_checks_tp_against_the_mesh():
    from automodel_cli.components.distributed.parallelize import parallelize_model

    with pytest.raises(ValueError, match="tp=2"):
        parallelize_model(tiny(), None, tp=2, mixed_precision=False)


def test_a_worker_that_destroyed_its_group_exits_with_its_code_after_exit_handlers(tmp_path):
    """``exit_process`` skips interpreter teardown (where gloo's leftover worker threads can
    abort a finished run) but still runs atexit handlers and flushes buffered output."""
    marker = tmp_path / "atexit-ran"
    script = f"""
import atexit, os, sys
import torch.distributed as dist
from automodel_cli.components.distributed import env
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:0")
from torch.distributed.device_mesh import init_device_mesh
mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
assert not env.process_group_destroyed()
env.destroy()
assert env.process_group_destroyed() and not dist.is_initialized()
atexit.register(lambda: open({str(marker)!r}, "w").write("ran"))
sys.stdout.write("buffered, no newline")
env.exit_process(3)
raise AssertionError("exit_process returned")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert result.stdout == "buffered, no newline"
    assert marker.read_text() == "ran"


def test_the_pipeline_dimension_multiplies_the_world_and_is_described_first():
    shape = MeshShape.resolve(1, -1, 1, 8, pp=2)
    assert (shape.pp, shape.dp_shard, shape.world_size) == (2, 4, 8)
    assert shape.describe().startswith("pp=2 x dp_replicate=1 x dp_shard=4")
    assert shape.as_dict() == {"pp": 2, "dp_replicate": 1, "dp_shard": 4, "tp": 1}
    with pytest.raises(UserError, match=r"pp x dp_replicate x tp = 3 x 1 x 1 = 3 does not divide 8"):
        MeshShape.resolve(1, -1, 1, 8, pp=3)
    assert MeshShape.resolve(1, -1, 2, 8, pp=2).describe().startswith("pp=2 x dp_replicate=1 x dp_shard=2")
    with pytest.raises(UserError, match="does not combine with distributed.cp=2"):
        MeshShape.resolve(1, -1, 1, 8, pp=2, cp=2)


def test_clipping_leaves_a_tied_copy_out_of_the_norm_but_scales_it():
    """A pipeline stage's copy of a tied weight has the same gradient as the original: counted
    once in the norm, clipped like every gradient."""
    import torch

    from automodel_cli.components.distributed.parallelize import clip_grad_norm_

    first, copy_ = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    first.grad, copy_.grad = torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0])
    norm = clip_grad_norm_([first, copy_], max_norm=1.0, uncounted=[copy_])
    assert norm == pytest.approx(5.0)
    assert torch.allclose(first.grad, torch.tensor([0.6, 0.8]), atol=1e-6)
    assert torch.equal(copy_.grad, first.grad)
