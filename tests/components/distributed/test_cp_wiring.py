"""Context parallelism as a run wires it (``distributed.cp``): the mesh arithmetic, the padding
multiple, the loss head's path for already-shifted targets and the checks before launch. The
runs themselves (torchrun, gloo) are tests/recipes/test_context_parallel_runs.py."""

from __future__ import annotations

import json

import pytest
import torch

from automodel_cli.components.distributed.context_parallel import shard_batch, unsupported_problem
from automodel_cli.components.distributed.mesh import MeshShape
from automodel_cli.components.launch.preflight import context_parallel_problems
from automodel_cli.components.loss.builtin import CHUNKED_CE, LINEAR_CE, MASKED_CE
from automodel_cli.components.loss.head import training_loss
from automodel_cli.components.loss.targets import shift_labels
from automodel_cli.errors import UserError
from automodel_cli.training.context_parallel import check_recipe, pad_multiple


# --------------------------------------------------------------------------- mesh arithmetic

@pytest.mark.parametrize(("args", "cp", "expected"), [
    ((1, -1, 1, 4), 2, (1, 2, 2, 1)),
    ((1, -1, 1, 2), 2, (1, 1, 2, 1)),
    ((1, -1, 2, 8), 2, (1, 2, 2, 2)),
    ((2, -1, 1, 8), 2, (2, 2, 2, 1)),
    ((1, 1, 1, 4), 4, (1, 1, 4, 1)),
])
def test_cp_multiplies_the_world_and_not_the_data_parallel_size(args, cp, expected):
    shape = MeshShape.resolve(*args, cp=cp)
    assert (shape.dp_replicate, shape.dp_shard, shape.cp, shape.tp) == expected
    assert shape.world_size == args[3]
    assert shape.dp_size == expected[0] * expected[1]  # cp peers read the same samples
    assert shape.as_dict()["cp"] == cp and f"cp={cp}" in shape.describe()


def test_default_cp_keeps_the_three_dimension_description():
    shape = MeshShape.resolve(1, -1, 1, world_size=2)
    assert shape.cp == 1 and "cp" not in shape.as_dict() and "cp" not in shape.describe()


def test_cp_not_fitting_the_world_names_every_number():
    with pytest.raises(UserError) as info:
        MeshShape.resolve(1, -1, 1, world_size=2, cp=3)
    message = str(info.value)
    for text in ("distributed.cp=3", "1 x 3 x 1 = 3 does not divide 2", "2 process(es)"):
        assert text in message, message
    with pytest.raises(UserError, match=r"multiply to 8 processes, but the run has 4"):
        MeshShape.resolve(1, 2, 1, world_size=4, cp=4)


@pytest.mark.parametrize("cp", [0, -1])
def test_cp_must_be_positive(cp):
    with pytest.raises(UserError, match=f"cp={cp}"):
        MeshShape.resolve(1, -1, 1, world_size=4, cp=cp)


def test_expert_parallelism_with_cp_is_refused():
    with pytest.raises(UserError, match="distributed.ep=2 and distributed.cp=2 cannot be combined"):
        MeshShape.resolve(1, -1, 1, world_size=8, ep=2, cp=2)


# --------------------------------------------------------------------------- padding, recipes

@pytest.mark.parametrize(("cp", "tp", "sp", "expected"), [
    (1, 1, False, None), (1, 2, True, 2), (2, 1, False, 4), (3, 1, False, 6), (2, 2, True, 4),
    (2, 3, True, 12), (2, 3, False, 4), (2, 4, True, 8),  # a rank's 8 / 2 tokens split over tp=4
])
def test_batches_pad_to_the_chunks_and_the_sequence_parallel_group(cp, tp, sp, expected):
    assert pad_multiple(cp, tp, sp) == expected


def test_recipes_without_a_split_step_are_refused():
    check_recipe("finetune", 2), check_recipe("pretrain", 2), check_recipe("distill", 1)
    with pytest.raises(UserError, match="not by `automodel distill`"):
        check_recipe("distill", 2)


# --------------------------------------------------------------------------- shifted targets

def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, use_cache=False)
    return LlamaForCausalLM(config).float().train()


@pytest.mark.parametrize("spec", [MASKED_CE, CHUNKED_CE, LINEAR_CE], ids=["masked_ce", "chunked_ce", "linear_ce"])
def test_shifted_targets_give_the_labels_loss_without_a_second_shift(spec):
    """One cp rank's view (cp_size=1: every token, the same targets): ``shifted=True`` with the
    shard's targets equals the loss of the Hugging Face labels; shifting them again would drop
    the last target of every row and predict the one after."""
    model = _tiny_llama()
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 40, (2, 8), generator=generator)
    labels = ids.clone()
    labels[:, :2] = -100
    inputs = {"input_ids": ids}
    expected = training_loss(model, inputs, labels, 12, spec)
    shard = shard_batch({"input_ids": ids, "labels": labels}, 1, 0)
    assert torch.equal(shard["targets"], shift_labels(labels))
    local = {"input_ids": shard["input_ids"], "position_ids": shard["position_ids"]}
    got = training_loss(model, local, shard["targets"], 12, spec, shifted=True)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    twice = training_loss(model, local, shard["targets"], 12, spec)
    assert abs(float(twice.detach()) - float(expected.detach())) > 1e-3


# --------------------------------------------------------------------------- checks before launch

class Config(dict):
    def get(self, dotted, default=None):
        return super().get(dotted, default)


def _model_dir(tmp_path, **config):
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_attention_heads": 4, **config}))
    return str(path)


def test_unsupported_attention_is_named():
    assert unsupported_problem({"model_type": "llama"}) is None
    assert "sliding-window" in unsupported_problem({"model_type": "mistral", "use_sliding_window": True,
                                                    "sliding_window": 16})
    assert "sliding-window" in unsupported_problem({"layer_types": ["full_attention", "sliding_attention"]})
    assert "soft-capping" in unsupported_problem({"model_type": "gemma2", "attn_logit_softcapping": 50.0})


@pytest.mark.parametrize(("recipe", "settings", "config", "key", "phrase"), [
    ("distill", {}, {}, "distributed.cp", "not by `automodel distill`"),
    ("finetune", {"data.name": "vlm"}, {}, "distributed.cp", "image-text batches"),
    ("finetune", {}, {"vision_config": {"hidden_size": 8}}, "distributed.cp", "vision-language models"),
    ("finetune", {}, {"attn_logit_softcapping": 30.0}, "distributed.cp", "soft-capping"),
    ("finetune", {}, {"text_config": {"model_type": "gemma3_text", "layer_types": ["sliding_attention"]}},
     "distributed.cp", "sliding-window"),
    ("finetune", {"data.packing": True, "data.max_length": 62}, {}, "data.max_length", "not a multiple of 4"),
    ("pretrain", {"data.max_length": 66}, {}, "data.max_length", "(pretrain blocks) is not a multiple of 4"),
    ("finetune", {"data.packing": True, "data.max_length": 64, "distributed.tp": 3,
                  "distributed.sequence_parallel": True}, {}, "data.max_length", "not a multiple of 12"),
])
def test_cp_settings_that_cannot_run_are_found(tmp_path, recipe, settings, config, key, phrase):
    cfg = Config({"model.path": _model_dir(tmp_path, **config), "distributed.cp": 2, **settings})
    found = context_parallel_problems(recipe, cfg)
    assert [k for k, _ in found] == [key], found
    assert phrase in found[0][1]


def test_fitting_cp_settings_pass(tmp_path):
    model = _model_dir(tmp_path)
    assert context_parallel_problems("finetune", Config({"model.path": model, "distributed.cp": 2,
                                                          "data.packing": True, "data.max_length": 64})) == []
    # unpacked rows are padded to the multiple by the collator: any max_length works
    assert context_parallel_problems("finetune", Config({"model.path": model, "distributed.cp": 2,
                                                          "data.max_length": 63})) == []
    assert context_parallel_problems("distill", Config({"model.path": model, "distributed.cp": 1})) == []
    assert context_parallel_problems("finetune", Config({"model.path": "acme/not-cached", "distributed.cp": 2})) == []
