"""``training_loss`` (components/loss/head.py) on real Hugging Face models: every kind of loss
spec gives the loss and parameter gradients of masked_ce on the model's full logits, and the head
is fused only where that is exact."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from automodel_cli.components.loss.builtin import CHUNKED_CE, LINEAR_CE, MASKED_CE
from automodel_cli.components.loss.head import fusable_head, training_loss
from automodel_cli.components.loss.linear_ce import linear_cross_entropy
from automodel_cli.components.loss.masked_ce import masked_cross_entropy
from automodel_cli.components.loss.spec import LossSpec
from tolerances import assert_close_f32, decoder_rounding

VOCAB = 50
#: float32 rounding of the loss and parameter gradients of tiny_llama on batch() (tests/tolerances.py).
ROUNDING = decoder_rounding(layers=2, hidden=16, intermediate=32, positions=11, vocab=VOCAB, tokens=3 * 11,
                            gradients=True)


def tiny_llama(tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=tie, use_cache=False)
    return LlamaForCausalLM(config).float().train()


def batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (3, 11), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    labels = input_ids.clone()
    labels[:, :4] = -100  # prompts
    labels[1, 8:] = -100  # padding
    return {"input_ids": input_ids, "attention_mask": attention_mask}, labels


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def reference(model, inputs, labels, n):
    logits = model(**inputs, use_cache=False).logits
    return grads_of(model, masked_cross_entropy(logits, labels, n))


def assert_matches(got, want, rounding=ROUNDING):
    """The same loss and parameter gradients, to float32 rounding (each gradient on its own scale)."""
    assert_close_f32(got[0], want[0], **rounding)
    assert got[1].keys() == want[1].keys() and got[1]
    for name in want[1]:
        assert_close_f32(got[1][name], want[1][name], **rounding, msg=name)


BUILTINS = pytest.mark.parametrize("loss_spec", [MASKED_CE, CHUNKED_CE, LINEAR_CE],
                                   ids=["masked_ce", "chunked_ce", "linear_ce"])


@BUILTINS
@pytest.mark.parametrize("tie", [True, False])
def test_every_builtin_loss_matches_full_logits_masked_ce(loss_spec, tie):
    model = tiny_llama(tie)
    inputs, labels = batch()
    assert fusable_head(model)[0] is model.lm_head
    want = reference(model, inputs, labels, 25)
    got = grads_of(model, training_loss(model, inputs, labels, 25, loss_spec.configured({"chunk_size": 4})))
    assert_matches(got, want)
    assert "forward" not in model.lm_head.__dict__  # the probe is gone


class _VocabRows(TorchDispatchMode):
    """Rows of every matmul output with a vocabulary-sized last dimension (the LM head's work)."""

    MATMULS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default"}

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func) in self.MATMULS and out.shape[-1] == VOCAB:
            self.rows.append(out.numel() // VOCAB)
        return out


def test_the_head_is_applied_only_where_needed():
    model = tiny_llama(tie=False)
    inputs, labels = batch()
    trained = int((labels[:, 1:] != -100).sum())
    assert trained < 3 * 11
    largest = {}
    for name, loss_spec in [("plain", lambda logits, labels, n=None: masked_cross_entropy(logits, labels, n)),
                            ("masked_ce", MASKED_CE), ("linear_ce", LINEAR_CE.configured({"chunk_size": 4}))]:
        with _VocabRows() as seen:
            training_loss(model, inputs, labels, 10, loss_spec).backward()
        largest[name] = max(seen.rows)
    assert largest == {"plain": 3 * 11, "masked_ce": trained, "linear_ce": 4}


def test_packed_inputs_with_position_ids():
    model = tiny_llama()
    input_ids = torch.randint(3, VOCAB, (2, 12))
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 1, 2]])
    labels = input_ids.clone()
    labels[position_ids == 0] = -100
    inputs = {"input_ids": input_ids, "position_ids": position_ids}
    want = reference(model, inputs, labels, 18)
    got = grads_of(model, training_loss(model, inputs, labels, 18, LINEAR_CE.configured({"chunk_size": 3})))
    assert_matches(got, want)


def test_plain_logits_losses_still_get_full_logits():
    """A plain function registered as a loss keeps the original contract."""
    seen = []

    def plain_loss(logits, labels, num_label_tokens=None):
        seen.append(tuple(logits.shape))
        return masked_cross_entropy(logits, labels, num_label_tokens)

    model = tiny_llama()
    inputs, labels = batch()
    want = reference(model, inputs, labels, 20)
    loss_spec = LossSpec.of(plain_loss).configured({"chunk_size": 4})
    got = grads_of(model, training_loss(model, inputs, labels, 20, loss_spec))
    assert seen == [(3, 11, VOCAB)]  # and chunk_size was not passed: it does not take one
    assert_matches(got, want)


@pytest.mark.parametrize("loss_spec", [MASKED_CE, LINEAR_CE], ids=["masked_ce", "linear_ce"])
def test_lora_model(loss_spec):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    inputs, labels = batch()
    assert fusable_head(model)[0] is not None
    want = reference(model, inputs, labels, 25)
    got = grads_of(model, training_loss(model, inputs, labels, 25, loss_spec.configured({"chunk_size": 5})))
    assert_matches(got, want)
    assert all("lora" in name for name in got[1])  # the frozen (tied) head got no gradient


def test_adapted_lm_head_falls_back_to_full_logits():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(tie=False), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    head, reason = fusable_head(model)
    assert head is None and "not a plain torch.nn.Linear" in reason
    inputs, labels = batch()
    want = reference(model, inputs, labels, 25)
    assert_matches(grads_of(model, training_loss(model, inputs, labels, 25, LINEAR_CE)), want)


def test_soft_capped_logits_are_never_fused():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                          final_logit_softcapping=1.0, use_cache=False)
    model = Gemma2ForCausalLM(config).float().train()
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # logits well beyond the cap, so capping matters
    head, reason = fusable_head(model)
    assert head is None and "final_logit_softcapping" in reason
    inputs, labels = batch()
    want = reference(model, inputs, labels, 25)
    got = grads_of(model, training_loss(model, inputs, labels, 25, LINEAR_CE))
    assert_matches(got, want)
    # the fused loss on uncapped logits would be a different number
    hidden = model.model(**inputs).last_hidden_state
    uncapped = linear_cross_entropy(hidden, model.lm_head.weight, labels, 25)
    assert abs(uncapped.item() - want[0].item()) > 0.1


class _ScalesItsLogits(torch.nn.Module):
    """A model that changes the logits after its head without saying so in its config."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.lm_head = torch.nn.Linear(8, VOCAB, bias=True)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.lm_head(self.embed(input_ids)) * 0.5)


def test_a_model_that_transforms_the_head_output_is_caught_and_computed_exactly():
    model = _ScalesItsLogits()
    inputs, labels = batch()
    want = reference(model, inputs, labels, 25)
    with pytest.warns(UserWarning, match="changes the logits after its LM head"):
        got = grads_of(model, training_loss(model, inputs, labels, 25, LINEAR_CE))
    assert_matches(got, want)
    assert fusable_head(model)[0] is None  # remembered: no second attempt
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_matches(grads_of(model, training_loss(model, inputs, labels, 25, LINEAR_CE)),
                       want)


def test_probe_is_removed_when_the_forward_fails():
    model = tiny_llama()
    inputs, labels = batch()
    inputs["input_ids"] = inputs["input_ids"] + 10 * VOCAB  # out of range: the embedding raises
    with pytest.raises(IndexError):
        training_loss(model, inputs, labels, 10, LINEAR_CE)
    assert "forward" not in model.lm_head.__dict__


# ------------------------------------------------------------------ distillation_training_loss
def tiny_teacher():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, use_cache=False)
    return LlamaForCausalLM(config).float().eval().requires_grad_(False)


def full_logits_distillation(model, teacher, inputs, labels, n, **kd):
    from automodel_cli.components.loss.kd import distillation_loss, kd_loss

    logits = model(**inputs, use_cache=False).logits
    with torch.no_grad():
        teacher_logits = teacher(**inputs, use_cache=False).logits
    ce = masked_cross_entropy(logits, labels, n)
    kl = kd_loss(logits, teacher_logits, labels, n, temperature=kd["temperature"], direction=kd["direction"])
    return distillation_loss(ce, kl, kd_weight=kd["kd_weight"], temperature=kd["temperature"]), ce, kl


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_distillation_from_hidden_states_matches_full_logits(direction):
    from automodel_cli.components.loss.head import distillation_training_loss

    model, teacher = tiny_llama(tie=False), tiny_teacher()
    inputs, labels = batch()
    kd = {"kd_weight": 0.4, "temperature": 2.0, "direction": direction}
    want = full_logits_distillation(model, teacher, inputs, labels, 30, **kd)
    want_grads = grads_of(model, want[0])[1]
    got = distillation_training_loss(model, teacher, inputs, labels, 30, LINEAR_CE.configured({"chunk_size": 5}),
                                     **kd)
    assert got is not None
    # the KL adds a second sum over the vocabulary and a few rounding steps
    kd_rounding = {"terms": ROUNDING["terms"] + VOCAB, "depth": ROUNDING["depth"] + 4}
    for g, w in zip(got, want):
        assert_close_f32(g.detach(), w.detach(), **kd_rounding)
    assert_matches(grads_of(model, got[0]), (want[0].detach(), want_grads), kd_rounding)
    assert all(p.grad is None for p in teacher.parameters())


def test_distillation_is_not_fused_for_unfused_losses_or_heads():
    from automodel_cli.components.loss.head import distillation_training_loss

    model, teacher = tiny_llama(), tiny_teacher()
    inputs, labels = batch()
    kd = {"kd_weight": 0.5, "temperature": 1.0, "direction": "forward"}
    assert distillation_training_loss(model, teacher, inputs, labels, 30, masked_cross_entropy, **kd) is None
    teacher.config.final_logit_softcapping = 30.0  # a teacher whose logits are changed after its head
    assert distillation_training_loss(model, teacher, inputs, labels, 30, LINEAR_CE, **kd) is None
