"""train.activation_checkpointing modes and train.compile on a real (tiny) Llama, single process
and through parallelize_model."""

from __future__ import annotations

import pytest
import torch

from automodel_cli.components.distributed.parallelize import parallelize_model
from automodel_cli.components.models.structure import decoder_layers
from automodel_cli.components.training.memory import (checkpointing_mode, compile_decoder_layers,
                                                      enable_activation_checkpointing)
from automodel_cli.errors import UserError
from tolerances import assert_close_f32, decoder_rounding


def tiny_llama(layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, use_cache=False)
    return LlamaForCausalLM(config).train()


def rounding(layers: int = 4) -> dict[str, int]:
    """float32 rounding of loss_and_grads(tiny_llama(layers)) (tests/tolerances.py)."""
    return decoder_rounding(layers=layers, hidden=16, intermediate=32, positions=12, vocab=40, tokens=24,
                            gradients=True)


def assert_same_math(got, want, layers: int = 4):
    assert_close_f32(got[0], want[0], **rounding(layers))
    for g, w in zip(got[1], want[1]):
        assert_close_f32(g, w, **rounding(layers))


def loss_and_grads(model):
    ids = torch.arange(24).reshape(2, 12) % 40
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("value, mode", [(False, "none"), (True, "full"), (None, "none"), ("none", "none"),
                                         ("full", "full"), ("selective", "selective"), ("Selective", "selective"),
                                         ("true", "full"), ("false", "none")])
def test_checkpointing_mode_accepts_booleans_and_names(value, mode):
    assert checkpointing_mode(value) == mode


def test_unknown_checkpointing_mode_is_a_usage_error():
    with pytest.raises(UserError, match="Did you mean `selective`"):
        checkpointing_mode("selectiv")


@pytest.mark.parametrize("mode, flags", [("full", [True] * 4), ("selective", [True, False, True, False]),
                                         ("none", [False] * 4)])
def test_modes_checkpoint_the_right_layers(mode, flags):
    model = tiny_llama()
    enable_activation_checkpointing(model, mode)
    assert [bool(layer.gradient_checkpointing) for layer in model.model.layers] == flags


@pytest.mark.parametrize("mode, mlp_calls", [("full", 8), ("selective", 6), ("none", 4)])
def test_modes_keep_the_math_and_recompute_what_they_say(mode, mlp_calls):
    want = loss_and_grads(tiny_llama())
    model = tiny_llama()
    enable_activation_checkpointing(model, mode)
    calls = []
    for layer in model.model.layers:  # a checkpointed layer runs its MLP again in backward
        layer.mlp.register_forward_pre_hook(lambda *args: calls.append(1))
    got = loss_and_grads(model)
    assert len(calls) == mlp_calls
    assert_same_math(got, want)


def test_non_hf_stacks_use_checkpoint_wrapper_on_every_other_layer(monkeypatch):
    model = tiny_llama()
    monkeypatch.setattr(type(model), "supports_gradient_checkpointing", False)
    enable_activation_checkpointing(model, "selective")
    wrapped = [type(layer).__name__ == "CheckpointWrapper" for layer in model.model.layers]
    assert wrapped == [True, False, True, False]


def test_compile_each_decoder_layer_keeps_the_math():
    want = loss_and_grads(tiny_llama(2))
    model = tiny_llama(2)
    assert compile_decoder_layers(model, "aot_eager") == 2
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in model.model.layers)
    assert getattr(model, "_compiled_call_impl", None) is None  # the rest of the model stays eager
    got = loss_and_grads(model)
    assert_same_math(got, want, layers=2)  # aot_eager's decompositions round in their own order


def test_parallelize_model_applies_selective_checkpointing_then_compile():
    want = loss_and_grads(tiny_llama())
    model = parallelize_model(tiny_llama(), None, tp=1, activation_checkpointing="selective", mixed_precision=False,
                              compile=True, compile_backend="aot_eager")
    layers = decoder_layers(model)
    assert [bool(layer.gradient_checkpointing) for layer in layers] == [True, False, True, False]
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in layers)
    got = loss_and_grads(model)
    assert_close_f32(got[0], want[0], **rounding())
