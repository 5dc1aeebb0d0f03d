"""Pipeline parallelism (``components/distributed/pipeline.py``).

Fast: how layers are split into stages, and that stage modules chained by hand in one process
compute exactly what the whole model computes (logits and loss), for a tiny Llama and a tiny
Qwen3 with sliding-window layers, with and without LoRA, on sdpa and eager attention, for plain,
padded and packed inputs. Slow: real pipelines of 2 processes (torchrun, gloo) with every
schedule against one process.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest

from automodel_cli.components.distributed.pipeline import (
    PipelineRunner,
    build_stage_module,
    keep_rank_part,
    pad_micro_batches,
    rank_stages,
    split_points,
    stage_view,
)
from automodel_cli.errors import UserError

# --------------------------------------------------------------------------- split_points


@pytest.mark.parametrize(("layers", "stages", "sizes"), [
    (4, 1, [4]),
    (4, 2, [2, 2]),
    (4, 3, [1, 2, 1]),     # the extra layer goes to a middle stage
    (10, 4, [2, 3, 3, 2]),
    (5, 2, [3, 2]),        # no middle stage: the first gets it, the last carries the head
    (6, 6, [1] * 6),
])
def test_split_by_count(layers, stages, sizes):
    ranges = split_points(layers, stages)
    assert [len(r) for r in ranges] == sizes
    assert [i for r in ranges for i in r] == list(range(layers))  # contiguous, in order, complete


def test_split_by_cost_minimises_the_largest_stage():
    # One expensive layer: it gets a stage of its own.
    assert split_points(6, 3, costs=[1, 1, 6, 1, 1, 1]) == [range(0, 2), range(2, 3), range(3, 6)]
    # The embedding (first) and head + loss (last) costs count towards the outer stages.
    assert split_points(6, 3, costs=[3, 1, 1, 1, 1, 1, 1, 3]) == [range(0, 1), range(1, 5), range(5, 6)]


def test_manual_split_points():
    assert split_points(6, 3, manual=[1, 5]) == [range(0, 1), range(1, 5), range(5, 6)]


@pytest.mark.parametrize(("args", "kwargs", "named"), [
    ((2, 3), {}, ["3 pipeline stages", "2"]),
    ((4, 0), {}, ["got 0"]),
    ((4, 2), {"manual": [2, 3]}, ["need 1 split points", "got 2", "[2, 3]"]),
    ((4, 2), {"manual": [4]}, ["[4]", "0..3", "stage 1 would start at layer 4"]),
    ((4, 3), {"manual": [3, 2]}, ["[3, 2]", "stage 1 would start at layer 3 and end before layer 2"]),
    ((4, 2), {"manual": [1.5]}, ["[1.5]"]),
    ((4, 2), {"costs": [1, 2]}, ["2 pipeline layer costs", "4 decoder layers", "6"]),
    ((4, 2), {"costs": [1, -1, 1, 1]}, ["negative"]),
])
def test_impossible_splits_are_refused_with_the_numbers(args, kwargs, named):
    with pytest.raises(UserError) as info:
        split_points(*args, **kwargs)
    for text in named:
        assert text in str(info.value)
    assert info.value.exit_code == 2


# --------------------------------------------------------------------------- stage modules

LAYERS = 4


def tiny(arch: str, lora: bool, attention: str = "sdpa"):
    import torch

    from _dist_worker import add_lora, make_model

    torch.manual_seed(0)
    extra = {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2} if arch == "qwen3" else {}
    model = make_model(arch, num_hidden_layers=LAYERS, attn_implementation=attention, **extra)
    if arch == "qwen3":  # layer types differ, so a stage must pick its own layers' masks
        assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    return add_lora(model) if lora else model


def inputs_of_each_kind():
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    packed = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], list(range(12))])
    return ids, {"plain": {}, "padded": {"attention_mask": mask}, "packed": {"position_ids": packed}}


def stages_of(model, ranges):
    return [build_stage_module(copy.deepcopy(model), i, len(ranges), r) for i, r in enumerate(ranges)]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_chained_stages_compute_the_whole_models_logits_and_loss(arch, lora, attention):
    """Bit for bit: each stage runs the same Hugging Face modules on the same tensors in the same
    order as the whole model (same code, same inputs: no rounding difference to allow for)."""
    import torch

    from automodel_cli.components.loss.builtin import MASKED_CE
    from automodel_cli.components.loss.head import training_loss

    model = tiny(arch, lora, attention)
    ranges = split_points(LAYERS, 3)
    stages = stages_of(model, ranges)
    stages[-1].set_loss(MASKED_CE)
    ids, kinds = inputs_of_each_kind()
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        for kind, kwargs in kinds.items():
            hidden = ids
            for stage in stages[:-1]:
                hidden = stage(hidden, **kwargs)
                assert hidden.shape == (2, 12, 64)
            logits = stages[-1](hidden, **kwargs)
            assert torch.equal(logits, model(input_ids=ids, use_cache=False, **kwargs).logits), kind
            stages[-1].num_label_tokens = 17
            loss = stages[-1](hidden, labels=labels, **kwargs)
            want = training_loss(model, {"input_ids": ids, **kwargs}, labels, 17, MASKED_CE)
            assert torch.equal(loss, want), kind


def test_each_stage_keeps_only_its_part_under_the_full_models_names():
    import torch

    model = tiny("llama", lora=True)
    full = {name for name, _ in model.named_parameters()}
    ranges = split_points(LAYERS, 3)
    stages = stages_of(model, ranges)
    held = [{name for name, _ in stage.model.named_parameters()} for stage in stages]
    assert set().union(*held) == full and sum(map(len, held)) == len(full)  # each exactly once
    for stage, names, layers in zip(stages, held, ranges):
        indices = {int(n.split(".layers.")[1].split(".")[0]) for n in names if ".layers." in n}
        assert indices == set(layers)
        assert any("embed_tokens" in n for n in names) == stage.is_first
        assert any("lm_head" in n for n in names) == stage.is_last
        assert any(n.endswith("model.norm.weight") for n in names) == stage.is_last
    assert len(stages[1].stack.layers) == 2 and isinstance(stages[1].stack.layers[-1], torch.nn.Module)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_stage_views_of_a_rank_part_chain_to_the_whole_model_and_leave_it_intact(lora):
    """A rank that runs every stage (the interleaved placement's rank of a 1-rank pipeline):
    its part is the whole model, and the views over it compute what the model computes, share its
    parameters and leave its modules, names and config as they were."""
    import torch

    model = tiny("llama", lora)
    names = [name for name, _ in model.named_parameters()]
    layers_before = model.get_base_model().model.layers if lora else model.model.layers
    ranges = split_points(LAYERS, 4)
    keep_rank_part(model, ranges, rank_stages(0, 1, 4))
    views = [stage_view(model, stage, 4, ranges[stage]) for stage in range(4)]
    assert [name for name, _ in model.named_parameters()] == names
    parameters = {id(p) for p in model.parameters()}
    assert all(id(p) in parameters for view in views for p in view.parameters())
    ids, kinds = inputs_of_each_kind()
    with torch.no_grad():
        for kind, kwargs in kinds.items():
            hidden = ids
            for view in views:
                hidden = view(hidden, **kwargs)
            assert torch.equal(hidden, model(input_ids=ids, use_cache=False, **kwargs).logits), kind
    bare = model.get_base_model() if lora else model
    assert bare.config.num_hidden_layers == LAYERS and bare.lm_head is not None
    assert len(bare.model.layers) == LAYERS and layers_before is not None


def test_a_rank_part_keeps_its_stages_layers_under_their_indices():
    import torch

    model = tiny("llama", lora=False)
    ranges = split_points(LAYERS, 4)
    keep_rank_part(model, ranges, rank_stages(1, 2, 2))  # pipeline rank 1 of 2, interleaved: stages 1 and 3
    names = {name for name, _ in model.named_parameters()}
    assert {int(n.split(".layers.")[1].split(".")[0]) for n in names if ".layers." in n} == {1, 3}
    assert isinstance(model.model.embed_tokens, torch.nn.Identity)  # stage 0 is rank 0's
    assert "lm_head.weight" in names and "model.norm.weight" in names  # the last stage is here
    assert model.config.num_hidden_layers == LAYERS  # the config describes the whole model
    view = stage_view(model, 3, 4, ranges[3])
    assert [int(k) for k in view.stack.layers._modules] == [3]
    with pytest.raises(UserError, match="does not hold decoder layer 0"):
        stage_view(model, 0, 4, ranges[0])


def test_a_stage_frees_the_layers_it_does_not_keep():
    model = tiny("llama", lora=False)
    dropped = weakref.ref(model.model.layers[3])
    stage = build_stage_module(model, 0, 2, range(0, 2))
    gc.collect()
    assert dropped() is None
    assert len(list(stage.model.model.layers)) == 2


def test_a_stage_builds_from_a_model_on_the_meta_device():
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny("qwen3", lora=False).config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    stage = build_stage_module(model, 1, 2, range(2, 4))
    names = [name for name, _ in stage.model.named_parameters()]
    assert all(p.is_meta for p in stage.parameters())
    assert "lm_head.weight" in names and not any("embed_tokens" in n for n in names)
    assert {n.split(".")[2] for n in names if ".layers." in n} == {"2", "3"}
    assert stage.stack.config.layer_types == ["sliding_attention"] * 2  # its own layers' types
    assert config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2  # untouched


@pytest.mark.parametrize(("stage", "stages", "layers", "named"), [
    (2, 2, range(0, 2), ["stage 2", "2 stages"]),
    (0, 2, range(2, 6), ["2..5", "0..3"]),
    (0, 2, range(0, 0), ["stage 0"]),
])
def test_bad_stage_requests_are_refused(stage, stages, layers, named):
    with pytest.raises(UserError) as info:
        build_stage_module(tiny("llama", lora=False), stage, stages, layers)
    for text in named:
        assert text in str(info.value)


# --------------------------------------------------------------------------- micro-batches


def test_padding_micro_batches_to_one_shape_keeps_the_loss():
    """Rows and positions added so that every micro-batch has one shape (pipeline buffers are
    fixed) carry labels -100 and sit after every real token: the step's loss is unchanged."""
    import torch

    from _pp_worker import label_tokens, micro_batches
    from automodel_cli.components.loss.builtin import MASKED_CE
    from automodel_cli.components.loss.head import training_loss
    from tolerances import first_loss_tolerance

    model = tiny("llama", lora=False)
    batches = micro_batches(0)
    padded = pad_micro_batches(batches)
    assert len({tuple(mb["input_ids"].shape) for mb in padded}) == 1
    assert len({tuple(mb) for mb in padded}) == 1
    total = label_tokens(batches)
    assert label_tokens(padded) == total

    def step_loss(micro):
        with torch.no_grad():
            return sum(float(training_loss(model, {k: v for k, v in mb.items() if k != "labels"}, mb["labels"],
                                           total, MASKED_CE)) for mb in micro)

    want = step_loss(batches)
    assert step_loss(padded) == pytest.approx(want, **first_loss_tolerance(
        want, layers=LAYERS, hidden=64, intermediate=128, vocab=128, positions=16, tokens=total))


def test_packed_and_left_padded_micro_batches_cannot_share_a_step():
    import torch

    ids = torch.ones((1, 4), dtype=torch.long)
    left_padded = {"input_ids": ids, "labels": ids, "attention_mask": torch.tensor([[0, 1, 1, 1]])}
    packed = {"input_ids": ids, "labels": ids, "position_ids": torch.tensor([[0, 1, 0, 1]])}
    with pytest.raises(ValueError, match="not right padding"):
        pad_micro_batches([left_padded, packed])


def test_unknown_schedule_is_refused():
    with pytest.raises(UserError, match="gpipe, 1f1b, interleaved_1f1b"):
        PipelineRunner([], None, "zero_bubble", "cpu", None)


# --------------------------------------------------------------------------- 2 processes


#: Per step, the pipelined loss and each gradient against one process running the same
#: micro-batches. The stages run the same kernels on the same tensors, but padding to one shape
#: changes the sdpa/BLAS blocking and the tied gradient is summed in another order, so they agree
#: to rounding: relative 1e-4 of each gradient's largest element (about 800 float32 ulps), far
#: below what a missing micro-batch, a wrong normaliser (a factor of the micro-batch count) or a
#: dropped tied-gradient half would change.
TOL = 1e-4
SCENARIOS = ["gpipe", "1f1b", "interleaved", "lora_gpipe", "lora_1f1b", "lora_interleaved", "qwen3_tied_linear_ce"]


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory):
    from pathlib import Path

    from test_distributed_parity import _launch

    worker = Path(__file__).with_name("_pp_worker.py")
    return _launch(2, SCENARIOS, tmp_path_factory.mktemp("pp2") / "results.json", worker)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pipeline_matches_one_process(two_stages, scenario):
    ranks = two_stages[scenario]
    assert [r["rank"] for r in ranks] == [0, 1]
    for step in range(2):
        results = [r["steps"][step] for r in ranks]
        for result in results:  # every rank reports the last stage's loss
            assert result["loss"] == pytest.approx(result["ref_loss"], rel=TOL), f"step {step}"
        held = set().union(*(r["held"] for r in results))
        assert set(results[0]["trainable"]) <= held, "some trainable parameter is on no stage"
        for rank, result in enumerate(results):
            worst = max(result["errors"], key=result["errors"].get)
            assert result["errors"][worst] <= TOL, f"rank {rank}, step {step}: gradient of {worst}"
