"""The router balance monitor (components/moe/balance.py) on real tiny Qwen3-MoE and Mixtral
models (tests/moe_models.py): its aux loss is Hugging Face's ``outputs.aux_loss``, it trains the
router, it records training losses only, it normalises per micro-batch, and its z-loss and
expert load are what their definitions say."""

from __future__ import annotations

import pytest
import torch

from automodel_cli.components.data.collate import SFTCollator
from automodel_cli.components.loss.builtin import MASKED_CE
from automodel_cli.components.loss.head import training_loss
from automodel_cli.components.moe.balance import (attach_monitor, find_routers, load_histograms, load_metrics,
                                                  monitor_of, token_mask)
from moe_models import KINDS, tiny_moe
from tolerances import assert_close_f32, f32_tol

LAYERS, EXPERTS, ROWS, POSITIONS = 2, 8, 4, 12
#: float32 rounding of a balance term: sums over every (layer, token) row and over the experts.
TERM_ROUNDING = {"terms": LAYERS * ROWS * POSITIONS + EXPERTS, "depth": 6}


def batch(padded: bool):
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, 64, (ROWS, POSITIONS), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if padded:
        attention_mask[1, 7:] = 0
        attention_mask[3, 4:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask}, labels


def hf_outputs(model, inputs, labels=None):
    return model(**inputs, labels=labels, output_router_logits=True, use_cache=False)


def monitored_loss(model, inputs, labels, **coefs):
    monitor = monitor_of(model) or attach_monitor(model, **coefs)
    loss = training_loss(model, inputs, labels, (labels[:, 1:] != -100).sum(), MASKED_CE)
    return loss, monitor.take_step()


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_aux_loss_and_loss_are_hugging_faces(kind, padded):
    model = tiny_moe(kind)
    inputs, labels = batch(padded)
    expected = hf_outputs(model, inputs, labels)  # HF: mean CE + router_aux_loss_coef * aux
    loss, step = monitored_loss(model, inputs, labels)
    assert_close_f32(step.sums["aux_loss"], expected.aux_loss, **TERM_ROUNDING)
    assert_close_f32(loss, expected.loss, terms=2 * TERM_ROUNDING["terms"] + 64, depth=40)
    assert "z_loss" not in step.sums  # the configs have no router_z_loss_coef
    # expert load: every real token goes to top_k experts in each layer
    real_tokens = float(inputs["attention_mask"].sum())
    assert step.load.shape == (LAYERS, EXPERTS)
    assert step.load.sum(dim=1).tolist() == [real_tokens * 2] * LAYERS


def test_padding_changes_the_aux_loss():
    """The padded batch's value differs from the same tokens counted unmasked: padding is left out."""
    model = tiny_moe("qwen3_moe")
    inputs, labels = batch(padded=True)
    _, masked = monitored_loss(model, inputs, labels)
    _, unmasked = monitored_loss(model, {"input_ids": inputs["input_ids"]}, labels)
    assert abs(float(masked.sums["aux_loss"]) - float(unmasked.sums["aux_loss"])) > 1e-4


def test_gradient_of_the_aux_term_reaches_the_router():
    model = tiny_moe("qwen3_moe")
    inputs, labels = batch(padded=True)
    router = find_routers(model)[0][0]

    def router_grad(coef):
        attach_monitor(model, aux_coef=coef)
        model.zero_grad(set_to_none=True)
        monitored_loss(model, inputs, labels)[0].backward()
        return router.weight.grad.clone()

    with_aux, without = router_grad(1.0), router_grad(0.0)
    model.zero_grad(set_to_none=True)
    # the aux term's gradient, from HF's own aux loss on the attention-masked batch
    hf_aux_grad = torch.autograd.grad(hf_outputs(model, inputs, None).aux_loss, router.weight)[0]
    assert hf_aux_grad.abs().max() > 0
    assert_close_f32(with_aux - without, hf_aux_grad, terms=2 * TERM_ROUNDING["terms"] + 64, depth=40,
                     scale=float(with_aux.abs().max()))


def test_evaluation_and_no_grad_forwards_record_nothing():
    model = tiny_moe("mixtral")
    monitor = attach_monitor(model)
    inputs, labels = batch(padded=False)
    model.eval()
    with torch.no_grad():
        model(**inputs, use_cache=False)
    model.train()
    model(**inputs, use_cache=False).logits.sum().backward()  # a forward outside training_loss
    assert monitor.take_step() is None
    loss, step = monitored_loss(model, inputs, labels)
    assert step is not None and monitor.take_step() is None  # taken: the next step starts afresh


def test_two_micro_batches_give_the_mean_of_their_aux_losses():
    model = tiny_moe("qwen3_moe")
    inputs, labels = batch(padded=True)
    halves = [({k: v[rows] for k, v in inputs.items()}, labels[rows]) for rows in (slice(0, 2), slice(2, 4))]
    expected = [hf_outputs(model, part).aux_loss for part, _ in halves]
    monitor = attach_monitor(model)
    monitor.micro_batches = 2
    losses = []
    for part, part_labels in halves:
        losses.append(training_loss(model, part, part_labels, (labels[:, 1:] != -100).sum(), MASKED_CE))
    step = monitor.take_step()
    assert_close_f32(step.sums["aux_loss"], (expected[0] + expected[1]) / 2, **TERM_ROUNDING)
    whole = attach_monitor(model)
    training_loss(model, inputs, labels, 1, MASKED_CE)
    assert torch.equal(step.load, whole.take_step().load)  # loads add up whatever the split


def test_z_loss_when_set():
    model = tiny_moe("mixtral")
    inputs, labels = batch(padded=True)
    router_logits = hf_outputs(model, inputs).router_logits
    mask = inputs["attention_mask"].reshape(-1).float()
    expected = sum((torch.logsumexp(layer.float(), -1).square() * mask).sum() for layer in router_logits) / (
        LAYERS * mask.sum())
    plain, _ = monitored_loss(model, inputs, labels)
    attach_monitor(model, z_coef=0.5)
    with_z, step = monitored_loss(model, inputs, labels)
    assert_close_f32(step.sums["z_loss"], expected, **TERM_ROUNDING)
    rtol, atol = f32_tol(float(with_z.detach()), terms=2 * TERM_ROUNDING["terms"] + 64, depth=40)
    assert float((with_z - plain).detach()) == pytest.approx(0.5 * float(step.sums["z_loss"]), rel=rtol, abs=atol)


def test_packed_padding_is_the_collators_dummy_document():
    """SFTCollator pads packed rows with a dummy document; token_mask leaves exactly it out."""
    samples = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9], "position_ids": [0, 1, 2, 0, 1]},
               {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 2]}]
    collated = SFTCollator(pad_token_id=0, packed=True, pad_to_multiple_of=4)(samples)
    mask = token_mask({"input_ids": collated["input_ids"], "position_ids": collated["position_ids"]},
                      collated["labels"])
    assert mask.tolist() == [[1] * 5 + [0] * 3, [1] * 3 + [0] * 5]
    unpadded = SFTCollator(pad_token_id=0, packed=True)([samples[0]])
    assert token_mask({"position_ids": unpadded["position_ids"]}, unpadded["labels"]) is None


def test_dense_models_get_no_monitor():
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert attach_monitor(dense, aux_coef=0.1) is None and monitor_of(dense) is None


def test_load_metrics_and_histograms():
    load = torch.tensor([[4.0, 4.0, 4.0, 4.0], [10.0, 2.0, 2.0, 2.0]])
    assert load_metrics(load) == {"expert_load_max_mean": 1.75, "expert_load_max_mean_layer0": 1.0,
                                  "expert_load_max_mean_layer1": 2.5}
    assert load_histograms(load) == {"expert_load/layer0": [4.0] * 4, "expert_load/layer1": [10.0, 2.0, 2.0, 2.0]}


@pytest.mark.parametrize("kind", ["olmoe", "qwen2_moe", "gpt_oss", "granitemoe"])
def test_other_families_aux_loss_is_hugging_faces(kind):
    """The routers are found from each model's own ``router_logits`` recorder, so every family
    that computes an aux loss gets Hugging Face's value and loss."""
    model = tiny_moe(kind)
    inputs, labels = batch(padded=True)
    expected = hf_outputs(model, inputs, labels)
    loss, step = monitored_loss(model, inputs, labels)
    assert_close_f32(step.sums["aux_loss"], expected.aux_loss, **TERM_ROUNDING)
    assert_close_f32(loss, expected.loss, terms=2 * TERM_ROUNDING["terms"] + 64, depth=40)


def test_expert_load_counts_the_experts_the_tokens_went_to():
    """DeepSeek-V3 routes by sigmoid scores plus a balancing bias, in groups: not the top-k of its
    logits. The load counts the experts each token was actually sent to; with a large bias on
    expert 5 every token goes there. Its config has no aux coefficient: nothing is trained."""
    model = tiny_moe("deepseek_v3")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.e_score_correction_bias.zero_()
            layer.mlp.gate.e_score_correction_bias[5] = 10.0
    inputs, labels = batch(padded=True)
    monitor = attach_monitor(model)
    assert monitor.aux_coef == 0.0 and len(monitor.experts) == LAYERS
    loss = training_loss(model, inputs, labels, (labels[:, 1:] != -100).sum(), MASKED_CE)
    step = monitor.take_step()
    real_tokens = float(inputs["attention_mask"].sum())
    assert step.load[:, 5].tolist() == [real_tokens] * LAYERS
    assert step.load.sum(dim=1).tolist() == [real_tokens * 2] * LAYERS
    plain = training_loss(model, inputs, labels, (labels[:, 1:] != -100).sum(), MASKED_CE)
    monitor.detach()
    assert torch.equal(loss, plain)  # coefficient 0: the loss is the CE alone
