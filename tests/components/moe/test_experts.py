"""The experts forward automodel installs (grouped GEMM and per-expert loop) computes what Hugging
Face's eager loop computes: outputs and gradients of whole tiny MoE models and of single experts
modules (transposed weights with biases and an interleaved gate included), with experts that get
no token; and the kernel is chosen as ``model.experts_kernel`` says."""

from __future__ import annotations

import copy

import pytest
import torch

from automodel_cli.components.moe.experts import (HF_FUSED, choose_kernel, experts_modules, grouped_mm_available,
                                                  install_experts, moe_kinds)
from automodel_cli.errors import UserError
from moe_models import tiny_moe
from tolerances import f32_tol

KERNELS = ["grouped_mm", "loop"]


def assert_close(got: torch.Tensor, expected: torch.Tensor, terms: int, depth: int = 8) -> None:
    rtol, atol = f32_tol(expected, terms=terms, depth=depth)
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)


def eager(model: torch.nn.Module) -> torch.nn.Module:
    model.config._experts_implementation = "eager"
    return model


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "gpt_oss", "granitemoe", "deepseek_v3"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_model_loss_and_gradients_match_the_eager_loop(kind, kernel):
    reference = eager(tiny_moe(kind))
    model = copy.deepcopy(reference)
    assert len(install_experts(model, [HF_FUSED], kernel)) == reference.config.num_hidden_layers
    assert {m._automodel_experts.kernel for m in experts_modules(model)} == {kernel}
    ids = torch.randint(3, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    expected, got = reference(ids, labels=ids), model(ids, labels=ids)
    expected.loss.backward()
    got.loss.backward()
    # hidden 64 -> vocab 64 over 2 layers of attention (64 + 24 positions) and experts (64 + 32)
    terms = 2 * (64 + 24 + 64 + 32) + 64
    assert_close(got.logits, expected.logits, terms)
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        assert q.grad is not None, name
        assert_close(q.grad, p.grad, terms * 2 + 48)


def gpt_oss_experts():
    from transformers import AutoConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    config = AutoConfig.for_model("gpt_oss", hidden_size=32, intermediate_size=16, num_local_experts=6,
                                  num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, vocab_size=64)
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    module = GptOssExperts(config)
    for param in module.parameters():
        torch.nn.init.normal_(param, std=0.2)
    return module


def qwen3_experts():
    return eager(tiny_moe("qwen3_moe")).model.layers[0].mlp.experts


@pytest.mark.parametrize("build", [qwen3_experts, gpt_oss_experts], ids=["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_experts_module_matches_the_eager_loop_with_idle_experts(build, kernel):
    """Tokens routed to a subset of the experts only (the others get none, including the first
    and the last), through every layout flag: gated, transposed, biased, interleaved gate/up."""
    reference = build()
    module = copy.deepcopy(reference)
    (installed,) = install_experts(module, [HF_FUSED], kernel)
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(20, reference.hidden_dim if hasattr(reference, "hidden_dim") else 32, generator=generator)
    busy = torch.tensor([1, 2, 4]) if reference.num_experts == 6 else torch.tensor([1, 3, 4, 6])
    index = busy[torch.stack([torch.randperm(len(busy), generator=generator)[:2] for _ in range(20)])]
    weights = torch.rand(20, 2, generator=generator).softmax(-1)
    inputs = [hidden.clone().requires_grad_(), weights.clone().requires_grad_()]
    mine = [hidden.clone().requires_grad_(), weights.clone().requires_grad_()]
    expected = reference(inputs[0], index, inputs[1])
    got = module(mine[0], index, mine[1])
    (expected * torch.arange(expected.shape[-1])).sum().backward()
    (got * torch.arange(got.shape[-1])).sum().backward()
    terms = hidden.shape[1] + 2 * reference.down_proj.shape[1]
    assert_close(got, expected, terms)
    for p, q in [*zip(reference.parameters(), module.parameters())]:
        assert_close(q.grad, p.grad, terms + 40, depth=12)
    for a, b in zip(inputs, mine):
        assert_close(b.grad, a.grad, terms, depth=12)
    idle = [e for e in range(reference.num_experts) if e not in busy.tolist()]
    assert torch.count_nonzero(module.down_proj.grad[idle]) == 0


def test_auto_takes_the_grouped_gemm_where_it_runs():
    cpu = torch.device("cpu")
    assert choose_kernel("auto", cpu, torch.float32) == ("grouped_mm" if grouped_mm_available(cpu, torch.float32)
                                                         else "loop")
    assert choose_kernel("loop", cpu, torch.float32) == "loop"
    assert choose_kernel("auto", torch.device("meta"), torch.float32) == "loop"
    with pytest.raises(UserError, match="model.experts_kernel=grouped_mm: the grouped GEMM does not run"):
        choose_kernel("grouped_mm", torch.device("meta"), torch.float32)


def test_a_dense_model_gets_nothing_installed():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2)
    assert install_experts(AutoModelForCausalLM.from_config(config), [HF_FUSED]) == []


def test_plugin_kinds_are_tried_before_the_built_in_ones():
    from automodel_cli.plugins import moe
    from automodel_cli.registry import MoeBlockRegistry, Provider

    registry = MoeBlockRegistry()
    with registry.provided_by(Provider("builtin-moe", builtin=True)):
        moe.register_moe_blocks(registry)
    mine = HF_FUSED.__class__(name="mine", matches=lambda m: True, parameters=lambda m: (), compute=None)
    with registry.provided_by(Provider("mine")):
        registry.add("a-plugin-kind", mine)
    assert moe_kinds(registry) == [mine, HF_FUSED]
    registry.add("broken", "automodel_cli.components.moe.experts:KERNELS")
    with pytest.raises(UserError, match="MoE block `broken` .* is a tuple, not an"):
        moe_kinds(registry)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_fused_experts_have_no_single_saved_name(kind):
    """The sharded reader asks each parameter's saved name: the fused experts (saved one tensor per
    expert) have none, so the model loads whole, and asking does not fail on the split."""
    from automodel_cli.components.models.materialize import checkpoint_key, saved_names

    model = tiny_moe(kind)
    names = saved_names(model, [checkpoint_key(name) for name, _ in model.named_parameters()])
    assert not [key for key in names if ".experts." in key]
