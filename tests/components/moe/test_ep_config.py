"""distributed.ep is checked against the mesh (it groups dp_shard ranks) and against the model's
number of experts, each with a message naming the numbers and the values that work."""

from __future__ import annotations

import pytest

from automodel_cli.components.distributed.mesh import MeshShape, check_ep
from automodel_cli.components.models.structure import num_experts
from automodel_cli.errors import UserError
from moe_models import tiny_moe_config


def test_ep_groups_dp_shard_ranks():
    shape = MeshShape.resolve(1, -1, 1, world_size=4, ep=2)
    assert (shape.dp_shard, shape.ep, shape.world_size) == (4, 2, 4)
    assert shape.as_dict() == {"dp_replicate": 1, "dp_shard": 4, "tp": 1, "ep": 2}
    assert "experts split ep=2 ways" in shape.describe()
    assert MeshShape.resolve(1, -1, 1, world_size=2).as_dict() == {"dp_replicate": 1, "dp_shard": 2, "tp": 1}


@pytest.mark.parametrize("args, ep, divisors", [((1, -1, 1, 4), 3, "1, 2, 4"), ((1, -1, 2, 4), 4, "1, 2"),
                                                ((1, -1, 1, 2), 0, "1, 2")])
def test_ep_that_does_not_divide_dp_shard_is_refused(args, ep, divisors):
    with pytest.raises(UserError, match=f"distributed.ep={ep} must be a positive integer dividing dp_shard") as err:
        MeshShape.resolve(*args[:3], world_size=args[3], ep=ep)
    assert f"Choose distributed.ep from {divisors} " in err.value.hint


@pytest.mark.parametrize("kind, experts", [("qwen3_moe", 8), ("mixtral", 8)])
def test_the_number_of_experts_is_read_from_the_config(kind, experts):
    config = tiny_moe_config(kind).to_dict()
    assert num_experts(config) == experts
    assert num_experts({"model_type": "llava", "text_config": config}) == experts
    assert check_ep(config, 4) == experts


def test_ep_must_divide_the_experts_of_a_moe_model():
    config = tiny_moe_config("qwen3_moe", num_experts=6).to_dict()
    with pytest.raises(UserError, match="distributed.ep=4 must divide the number of experts, but the model has 6"):
        check_ep(config, 4)
    with pytest.raises(UserError, match=r"distributed.ep=2 .* but the model \(llama\) has no experts"):
        check_ep({"model_type": "llama", "num_hidden_layers": 2}, 2)
    assert check_ep({"model_type": "llama"}, 1) is None
