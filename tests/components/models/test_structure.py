"""Model structure on real (tiny) models: a Llama, the same Llama under a peft LoRA wrapper, and a
multimodal Gemma 3 (vision tower + text decoder), all built from configs offline."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from automodel_cli.components.models import structure
from automodel_cli.errors import UserError


def tiny_llama(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=32, tie_word_embeddings=tie))


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))


def tiny_gemma3_multimodal():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=8, patch_size=4),
        mm_tokens_per_image=4)
    return Gemma3ForConditionalGeneration(config)


def test_a_plain_model_is_its_own_base():
    model = tiny_llama()
    assert not structure.is_peft_model(model)
    assert structure.unwrap(model) is model


def test_unwrap_finds_the_model_inside_a_peft_wrapper():
    model = tiny_llama()
    wrapped = with_lora(model)
    assert structure.is_peft_model(wrapped)
    assert structure.unwrap(wrapped) is model
    # peft's inner tuner holds the config but is not the wrapper: nothing to unwrap there
    assert not structure.is_peft_model(wrapped.base_model)


def test_decoder_layers_of_a_causal_lm_and_through_peft():
    model = tiny_llama()
    layers = structure.decoder_layers(model)
    assert layers == list(model.model.layers)
    wrapped = with_lora(model)
    assert structure.decoder_layers(wrapped) == layers
    prefix, stack = structure.decoder_stack(wrapped)
    assert prefix == "base_model.model.model." and stack is model.model


def test_decoder_layers_fall_back_to_the_decoder_stack():
    """A model class that declares no ``_no_split_modules``: the ``layers`` of the decoder."""
    model = tiny_llama()
    model._no_split_modules = None
    assert structure.decoder_layers(model) == list(model.model.layers)
    assert structure.decoder_stack(model.model) == ("", model.model)


def test_a_model_without_a_decoder_is_a_user_error():
    with pytest.raises(UserError, match="Cannot find the decoder layers of Linear"):
        structure.decoder_layers(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("tie", [False, True])
def test_output_head_names_the_lm_head(tie):
    model = tiny_llama(tie=tie)
    assert structure.output_head(model) == (model.lm_head, "lm_head")
    wrapped = with_lora(model)
    assert structure.output_head(wrapped) == (model.lm_head, "base_model.model.lm_head")
    assert wrapped.get_submodule(structure.output_head(wrapped)[1]) is model.lm_head


def test_a_model_without_an_lm_head_has_no_output_head():
    from transformers import LlamaModel

    assert structure.output_head(LlamaModel(tiny_llama().config)) == (None, None)


def test_multimodal_model_text_config_decoder_and_head():
    model = tiny_gemma3_multimodal()
    text = structure.text_config(model.config)
    assert text is model.config.text_config and text.vocab_size == 64
    prefix, stack = structure.decoder_stack(model)
    assert prefix == "model.language_model." and len(stack.layers) == 2
    layers = structure.decoder_layers(model)
    # every block HF keeps whole: the vision tower's, then the text decoder's layers
    assert [type(layer).__name__ for layer in layers][-2:] == ["Gemma3DecoderLayer"] * 2
    assert list(stack.layers) == layers[-2:]
    assert any(type(layer).__name__ == "SiglipEncoderLayer" for layer in layers)
    assert structure.output_head(model) == (model.lm_head, "lm_head")


def test_text_config_of_plain_and_config_like_objects():
    llama = tiny_llama().config
    assert structure.text_config(llama) is llama
    inner = SimpleNamespace(vocab_size=5)
    assert structure.text_config(SimpleNamespace(text_config=inner)) is inner
    plain = SimpleNamespace(vocab_size=7)
    assert structure.text_config(plain) is plain
