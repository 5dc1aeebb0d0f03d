"""Multi-process worker for the VLM FSDP2 parity test (launched by torchrun).

    torchrun --standalone --nproc-per-node N _vlm_dist_worker.py OUT.json MODEL_DIR [tp]

Builds the tiny Qwen2-VL of MODEL_DIR as the recipe does (``build_model``: meta device, FSDP2 on
every decoder layer and vision block when N > 1, then each rank reads its shards), with the vision
tower trained too (``model.freeze_vision=false``) so its sharded gradients matter, and trains a
few optimizer steps on a fixed global batch of images and text split over the data-parallel
ranks (loss = token CE sum / label tokens of the whole step, gradients summed). Rank 0 writes the
losses, the gradient norms and how many FSDP units hold vision blocks and decoder layers.
With ``tp`` the N processes are one tensor-parallel group instead (the language model sharded by
its plan, the vision tower replicated), all seeing the whole batch.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: vlm_models
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))  # _dist_worker

from _dist_worker import finish  # noqa: E402
from vlm_models import IMAGE_TOKEN, VISION_END, VISION_START, vlm_inputs  # noqa: E402

from automodel_cli.components.distributed.env import init_distributed  # noqa: E402
from automodel_cli.components.distributed.mesh import MeshShape, all_reduce_dp, build_mesh, dp_rank, dp_world_size  # noqa: E402
from automodel_cli.components.distributed.parallelize import clip_grad_norm_  # noqa: E402
from automodel_cli.components.loss.masked_ce import masked_cross_entropy  # noqa: E402
from automodel_cli.components.optim.build import build_optimizer  # noqa: E402
from automodel_cli.config.resolve import defaults_layer, layer_from_overrides, resolve  # noqa: E402
from automodel_cli.plugins import parallel_plans  # noqa: E402
from automodel_cli.registry import ParallelPlanRegistry  # noqa: E402
from automodel_cli.training.model_setup import build_model  # noqa: E402

STEPS = 4
GLOBAL_BATCH = 4
PATCHES = 16  # per image (vlm_inputs: a 4x4 grid)


def share(inputs: dict, rank: int, ranks: int) -> dict:
    """This data-parallel rank's samples: per-token tensors by row, patches by image."""
    per = GLOBAL_BATCH // ranks
    rows = slice(rank * per, (rank + 1) * per)
    out = {k: v[rows] for k, v in inputs.items() if k not in ("pixel_values",)}
    out["pixel_values"] = inputs["pixel_values"][rank * per * PATCHES:(rank + 1) * per * PATCHES]
    return out


def main() -> None:
    out, model_dir = sys.argv[1], sys.argv[2]
    env_tp = sys.argv[3:] == ["tp"]
    torch.set_num_threads(1)
    env = init_distributed()
    cfg = resolve([defaults_layer(), layer_from_overrides([f"model.path={model_dir}", "model.freeze_vision=false"])])
    registry = ParallelPlanRegistry()
    parallel_plans.register_parallel_plans(registry)
    mesh = None
    tp = env.world_size if env_tp else 1
    if env.world_size > 1:
        mesh = build_mesh(MeshShape.resolve(1, env.world_size // tp, tp, env.world_size), "cpu")
    cpu = types.SimpleNamespace(device=torch.device("cpu"), autocast_dtype=None)
    model = build_model(cfg, cfg.model, precision=cpu, mesh=mesh, shape=types.SimpleNamespace(tp=tp),
                        registries=types.SimpleNamespace(parallel_plans=registry), sequence_parallel=False,
                        dtype=torch.float32, trainable=True, say=lambda _: None)
    optimizer = build_optimizer(model, types.SimpleNamespace(weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8), 1e-3)
    ranks, rank = (dp_world_size(mesh), dp_rank(mesh)) if mesh is not None else (1, 0)
    clip = clip_grad_norm_ if mesh is not None else torch.nn.utils.clip_grad_norm_
    losses, norms = [], []
    for step in range(STEPS):
        inputs = share(vlm_inputs("qwen2_vl", batch=GLOBAL_BATCH, seed=step), rank, ranks)
        labels = inputs["input_ids"].clone()
        labels[(labels == IMAGE_TOKEN) | (labels == VISION_START) | (labels == VISION_END)] = -100
        labels[:, :1 + step % 2] = -100  # uneven label counts over steps
        local = int((labels[:, 1:] != -100).sum())
        tokens = all_reduce_dp(torch.tensor(local), mesh) if mesh is not None else torch.tensor(local)
        logits = model(**inputs, use_cache=False).logits
        loss = masked_cross_entropy(logits, labels, tokens)
        loss.backward()
        loss = loss.detach()
        losses.append(float(all_reduce_dp(loss, mesh) if mesh is not None else loss))
        norms.append(float(clip([p for p in model.parameters() if p.requires_grad], 1.0)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    from torch.distributed.fsdp import FSDPModule

    units = [type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)]
    finish(env, out, {"losses": losses, "grad_norms": norms, "units": units})


if __name__ == "__main__":
    main()
