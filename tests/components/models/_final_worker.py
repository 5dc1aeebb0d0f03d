"""Write final/ of a tiny model twice and compare: with ``save_final`` (every tensor gathered and
written one at a time) and the way it was written before it (the whole state dict gathered on
rank 0 by ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``, then
``save_pretrained(state_dict=...)``; in one process ``save_pretrained()`` itself).

    torchrun --standalone --nproc-per-node 2 _final_worker.py OUT.json WORK_DIR SCENARIO [...]

``compare`` also runs in the test process for one-process models. While ``save_final`` runs,
every tensor ``parallelize.full_tensor`` returns is tracked until it is freed: ``peak_bytes`` is
the most gathered bytes alive at once on rank 0.
"""

from __future__ import annotations

import sys
import weakref
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "distributed"))

from _dist_worker import finish, make_model  # noqa: E402  (tiny models of each architecture)

# name -> (architecture, dp_shard, tp)
SCENARIOS = {
    "fsdp": ("llama", 2, 1),
    "tp": ("llama", 1, 2),
    "fsdp_qwen3_tied": ("qwen3", 2, 1),
}


def tokenizer():
    from transformers import AutoTokenizer

    from automodel_cli.assets import demo_dir

    return AutoTokenizer.from_pretrained(demo_dir())


class GatheredBytes:
    """Counts the bytes of the tensors ``parallelize.full_tensor`` returned that are still alive."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def __enter__(self) -> GatheredBytes:
        from automodel_cli.components.distributed import parallelize

        self._module, self._real = parallelize, parallelize.full_tensor

        def tracked(value, *, keep):
            tensor = self._real(value, keep=keep)
            if tensor is not None:
                size = tensor.numel() * tensor.element_size()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(tensor, self._freed, size)
            return tensor

        parallelize.full_tensor = tracked
        return self

    def _freed(self, size: int) -> None:
        self.live -= size

    def __exit__(self, *exc) -> None:
        self._module.full_tensor = self._real


def compare(model, work: Path, *, distributed: bool) -> dict | None:
    """Write both ways into ``work`` and compare them (rank 0's result; None on other ranks)."""
    from safetensors.torch import load_file

    from automodel_cli.components.checkpoint.collective import rank
    from automodel_cli.components.models.saving import save_final

    with GatheredBytes() as gathered:
        new = save_final(model, tokenizer(), work / "new", merge=False, base_path=None)
    old = work / "old"
    if distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank() == 0:
            model.save_pretrained(old, state_dict=state)
        torch.distributed.barrier()
    else:
        model.save_pretrained(old)
    if rank() != 0:
        return None
    ours = {k: v for f in sorted(new.glob("*.safetensors")) for k, v in load_file(f).items()}
    before = {k: v for f in sorted(old.glob("*.safetensors")) for k, v in load_file(f).items()}
    from automodel_cli.components.checkpoint.state import tied_aliases

    aliases = tied_aliases(model)
    return {
        "keys": sorted(ours),
        "missing": sorted(set(before) - set(ours)),
        "extra": sorted(set(ours) - set(before)),
        "unequal": sorted(k for k in ours if k in before and not torch.equal(ours[k], before[k])),
        # keys only the old path wrote: tied aliases equal to the tensor kept under the first name
        "dropped_aliases_equal": all(k in aliases and aliases[k] in ours and torch.equal(before[k], ours[aliases[k]])
                                     for k in set(before) - set(ours)),
        "config_equal": (new / "config.json").read_text() == (old / "config.json").read_text(),
        "generation_config_equal": (new / "generation_config.json").read_text()
        == (old / "generation_config.json").read_text(),
        "tokenizer": (new / "tokenizer.json").is_file(),
        "peak_bytes": gathered.peak,
        "largest_bytes": max(t.numel() * t.element_size() for t in ours.values()),
        "total_bytes": sum(t.numel() * t.element_size() for t in ours.values()),
    }


def run(name: str, work: Path, env, registry) -> dict | None:
    from automodel_cli.components.distributed.mesh import MeshShape, build_mesh
    from automodel_cli.components.distributed.parallelize import parallelize_model

    arch, shard, tp = SCENARIOS[name]
    torch.manual_seed(0)  # identical weights on every rank
    model = make_model(arch)
    mesh = build_mesh(MeshShape.resolve(1, shard, tp, env.world_size), "cpu")
    model.train()
    parallelize_model(model, mesh, plan_registry=registry, tp=tp, mixed_precision=False)
    return compare(model, work / name, distributed=True)


def main() -> None:
    from automodel_cli.components.distributed.env import init_distributed
    from automodel_cli.plugins import parallel_plans
    from automodel_cli.registry import ParallelPlanRegistry

    out, work, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    torch.set_num_threads(1)
    env = init_distributed()
    registry = ParallelPlanRegistry()
    parallel_plans.register_parallel_plans(registry)
    finish(env, out, {name: run(name, work, env, registry) for name in names})


if __name__ == "__main__":
    main()
