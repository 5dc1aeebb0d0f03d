"""Which checkpoint keys a pipeline stage reads and tolerates (``components/checkpoint/stages.py``).
The whole round trip across pipeline sizes runs in ``tests/recipes/test_pipeline_runs.py``."""

from __future__ import annotations

import pytest

from automodel_cli.components.checkpoint import stages


@pytest.fixture
def head_stage():
    stages.set_part(stages.PipelinePart(group=None, tied={"lm_head.weight": "model.embed_tokens.weight"}))
    yield
    stages.set_part(None)


def test_a_whole_model_renames_nothing():
    assert stages.part() is None
    assert stages.stored_names(["lm_head.weight"], {"model.embed_tokens.weight"}) == {}
    assert stages.other_stages({"a"}) == set() and stages.all_tied() == {}


def test_a_stage_reads_its_tied_head_copy_under_the_embeddings_name(head_stage):
    stored = {"model.embed_tokens.weight", "state.model.embed_tokens.weight.exp_avg",
              "param_groups.model.embed_tokens.weight.lr"}
    keys = ["lm_head.weight", "state.lm_head.weight.exp_avg", "param_groups.lm_head.weight.lr", "lm_head.weightless"]
    assert stages.stored_names(keys, stored) == {
        "lm_head.weight": "model.embed_tokens.weight",
        "state.lm_head.weight.exp_avg": "state.model.embed_tokens.weight.exp_avg",
        "param_groups.lm_head.weight.lr": "param_groups.model.embed_tokens.weight.lr"}
    # A checkpoint saved with the same split has the copy under its own name: read it as is.
    assert stages.stored_names(["lm_head.weight"], stored | {"lm_head.weight"}) == {}


def test_a_whole_model_tolerates_the_copies_a_stage_saved():
    tied = {"lm_head.weight": "model.embed_tokens.weight"}
    stored = {"model.embed_tokens.weight", "lm_head.weight", "state.lm_head.weight.exp_avg", "lm_head.weightless"}
    assert stages.tied_copies(stored, tied) == {"lm_head.weight", "state.lm_head.weight.exp_avg"}
