"""``LossSpec`` (components/loss/spec.py): what it accepts, how options reach its functions, how
the loss registry takes its option table from it, and the fallback a fused loss runs on a
tensor-parallel LM head."""

from __future__ import annotations

import functools

import pytest
import torch

from automodel_cli.components.loss.builtin import CHUNKED, LINEAR_CE, MASKED_CE
from automodel_cli.components.loss.chunked_ce import chunked_cross_entropy
from automodel_cli.components.loss.head import training_loss
from automodel_cli.components.loss.kd import linear_distillation_loss
from automodel_cli.components.loss.linear_ce import linear_cross_entropy
from automodel_cli.components.loss.masked_ce import masked_cross_entropy
from automodel_cli.components.loss.spec import LossSpec
from automodel_cli.config import option
from automodel_cli.errors import UserError
from automodel_cli.registry import LossRegistry
from test_loss_head import VOCAB, assert_matches, batch, grads_of, reference, tiny_llama


def logits_loss(logits, labels, num_label_tokens=None, *, chunk_size=None):
    return masked_cross_entropy(logits, labels, num_label_tokens)


def fused_loss(hidden, weight, targets, num_label_tokens=None, *, bias=None):
    raise AssertionError("a fused loss must not run on a head that cannot be fused")


@pytest.mark.parametrize("fields, problem", [
    ({"kind": "rows", "fn": logits_loss}, "kind must be one of logits, fused"),
    ({"kind": "logits", "fn": None}, "fn must be a callable or a 'module:attr' string"),
    ({"kind": "logits", "fn": "no_colon"}, "fn must be a callable"),
    ({"kind": "logits", "fn": logits_loss, "check": 3}, "check must be a callable"),
    ({"kind": "logits", "fn": logits_loss, "logits_fallback": masked_cross_entropy}, "only a fused loss"),
    ({"kind": "logits", "fn": logits_loss, "distillation": linear_distillation_loss}, "only a fused loss"),
    ({"kind": "fused", "fn": fused_loss, "rows": True}, "rows=True describes a logits loss"),
    ({"kind": "logits", "fn": logits_loss, "options": [("chunk_size", 3)]}, "options must be a mapping"),
])
def test_a_spec_that_cannot_be_called_correctly_is_refused_when_declared(fields, problem):
    with pytest.raises(ValueError, match=problem):
        LossSpec(**fields)


def test_a_plain_function_is_a_logits_loss():
    spec = LossSpec.of(logits_loss)
    assert (spec.kind, spec.fn, spec.rows, spec.logits_fn, spec.options) == ("logits", logits_loss, False,
                                                                              logits_loss, {})
    assert LossSpec.of(spec) is spec  # nothing to load


def test_a_function_declaring_its_contract_by_attributes_is_refused_not_miscalled():
    def old_style(hidden, weight, targets, num_label_tokens=None, *, bias=None):
        return linear_cross_entropy(hidden, weight, targets, num_label_tokens, bias=bias)

    old_style.fused = True
    with pytest.raises(UserError, match=r"loss `old` declares how to call it with function attributes \(fused\)") as error:
        LossSpec.of(old_style, "old")
    assert "LossSpec(kind=..., fn=...)" in error.value.hint


def test_functions_named_by_path_load_on_use_and_a_bad_path_names_the_field():
    spec = LINEAR_CE.loaded("linear_ce")
    assert (spec.fn, spec.logits_fallback, spec.distillation) == (linear_cross_entropy, chunked_cross_entropy,
                                                                  linear_distillation_loss)
    assert isinstance(LINEAR_CE.fn, str)  # the declaration itself is unchanged
    broken = LossSpec(kind="logits", fn=logits_loss, check="automodel_cli.components.loss.kernels:no_such_check")
    with pytest.raises(UserError, match="loss `mine`: its check `automodel_cli.components.loss.kernels:no_such_check` "
                                        "cannot be loaded"):
        broken.loaded("mine")


def test_configured_hands_each_function_only_the_options_its_signature_names():
    def takes_any(logits, labels, num_label_tokens=None, **options):
        return options

    spec = LINEAR_CE.configured({"chunk_size": 7})
    for bound, fn in ((spec.fn, linear_cross_entropy), (spec.logits_fn, chunked_cross_entropy),
                      (spec.distillation, linear_distillation_loss)):
        assert isinstance(bound, functools.partial) and bound.func is fn and bound.keywords == {"chunk_size": 7}
    masked = MASKED_CE.configured({"chunk_size": 7})
    assert masked.fn is masked_cross_entropy  # it names no option: called exactly as before
    assert LossSpec.of(takes_any).configured({"a": 1, "b": None}).fn(None, None) == {"a": 1, "b": None}


def test_a_fused_loss_without_a_fallback_falls_back_to_masked_ce():
    assert LossSpec(kind="fused", fn=fused_loss).logits_fn is masked_cross_entropy


def test_the_registry_takes_the_option_table_from_the_spec():
    registry = LossRegistry()
    registry.add("chunky", LossSpec(kind="logits", fn=logits_loss, options=CHUNKED))
    registry.add("plain", logits_loss)
    registry.add("by_path", "automodel_cli.components.loss.masked_ce:masked_cross_entropy")
    assert registry.get("chunky").option_table() is CHUNKED
    assert registry.get("plain").option_table() == registry.get("by_path").option_table() == {}
    with pytest.raises(ValueError, match="would live at `loss.name`"):  # a core key of the loss section
        registry.add("name", LossSpec(kind="logits", fn=logits_loss, options={"x": option(int, 1, "X.")}))


# ----------------------------------------------------------------- a tensor-parallel LM head
@pytest.fixture
def one_process_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_fused_loss_runs_its_logits_fallback_on_a_tensor_parallel_head(one_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    model = tiny_llama(tie=False)
    inputs, labels = batch()
    want = reference(model, inputs, labels, 25)
    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate(), use_local_output=True)})
    seen = []

    def fallback(logits, labels, num_label_tokens=None, *, chunk_size=None):
        seen.append((tuple(logits.shape), chunk_size))
        return chunked_cross_entropy(logits, labels, num_label_tokens, chunk_size=chunk_size)

    spec = LossSpec(kind="fused", fn=fused_loss, logits_fallback=fallback, options=CHUNKED).configured({"chunk_size": 4})
    got = grads_of(model, training_loss(model, inputs, labels, 25, spec))
    assert seen == [((3, 11, VOCAB), 4)]  # the full logits, with the loss's option
    got = (got[0], {name: grad.full_tensor() if hasattr(grad, "full_tensor") else grad
                    for name, grad in got[1].items()})
    assert_matches(got, want)
    assert "forward" not in model.lm_head.__dict__
