"""Multi-process worker for the pipeline-parallel tests (launched by torchrun, 2 processes).

    torchrun --standalone --nproc-per-node 2 _pp_worker.py OUT.json SCENARIO [SCENARIO ...]

Every scenario runs two optimizer steps' forward and backward (micro-batches of different shapes,
with and without padding masks) through a 2-rank pipeline, and every rank also runs the same
micro-batches through the whole model in one process (``training_loss``, loss normalised by
the step's trained tokens, as the recipes do). Each rank reports, for the parameters its stages
hold, the largest gradient difference relative to that gradient's largest magnitude; rank 0
writes everything with both losses.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist

from _dist_worker import add_lora, finish, make_model
from automodel_cli.components.distributed.env import init_distributed
from automodel_cli.components.distributed.pipeline import PipelineRunner, build_stage_module, split_points
from automodel_cli.components.loss.builtin import LINEAR_CE, MASKED_CE
from automodel_cli.components.loss.head import training_loss

LAYERS = 4
VOCAB = 128

# name -> (architecture, lora, schedule, loss)
SCENARIOS = {
    "gpipe": ("llama", False, "gpipe", MASKED_CE),
    "1f1b": ("llama", False, "1f1b", MASKED_CE),
    "interleaved": ("llama", False, "interleaved_1f1b", MASKED_CE),
    "lora_gpipe": ("llama", True, "gpipe", MASKED_CE),
    "lora_1f1b": ("llama", True, "1f1b", MASKED_CE),
    "lora_interleaved": ("llama", True, "interleaved_1f1b", MASKED_CE),
    "qwen3_tied_linear_ce": ("qwen3", False, "1f1b", LINEAR_CE),  # tied embedding/head, fused loss
}


def micro_batches(step: int) -> list[dict]:
    """Four micro-batches of different rows and lengths; one right-padded with a mask, one
    packed (position ids restart), the rest plain."""
    generator = torch.Generator().manual_seed(100 + step)
    shapes = [(2, 16 - step), (1, 12), (2, 10 + step), (1, 14)]
    batches = []
    for index, (rows, length) in enumerate(shapes):
        ids = torch.randint(3, VOCAB, (rows, length), generator=generator)
        labels = ids.clone()
        labels[:, : index + step] = -100
        batch = {"input_ids": ids, "labels": labels}
        if index == 1:
            mask = torch.ones_like(ids)
            mask[:, -3:] = 0
            labels[:, -3:] = -100
            batch["attention_mask"] = mask
        if index == 3:
            batch["position_ids"] = torch.cat([torch.arange(6), torch.arange(length - 6)]).unsqueeze(0)
        batches.append(batch)
    return batches


def label_tokens(batches: list[dict]) -> int:
    return sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in batches)


def reference_step(model, batches: list[dict], spec) -> tuple[float, dict]:
    total = label_tokens(batches)
    loss_sum = 0.0
    for mb in batches:
        inputs = {k: v for k, v in mb.items() if k != "labels"}
        loss = training_loss(model, inputs, mb["labels"], total, spec)
        loss.backward()
        loss_sum += float(loss.detach())
    grads = {name: p.grad.clone() for name, p in model.named_parameters(remove_duplicate=False) if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss_sum, grads


def run(name: str, rank: int, size: int) -> dict:
    arch, lora, schedule, spec = SCENARIOS[name]
    torch.manual_seed(0)  # identical initial weights on every rank
    model = make_model(arch, num_hidden_layers=LAYERS)
    if lora:
        model = add_lora(model)
    model.train()
    virtual = 2 if schedule == "interleaved_1f1b" else 1
    ranges = split_points(LAYERS, size * virtual)
    indices = [rank + v * size for v in range(virtual)]
    stages = [build_stage_module(copy.deepcopy(model), i, size * virtual, ranges[i]) for i in indices]
    runner = PipelineRunner(stages, dist.group.WORLD, schedule, torch.device("cpu"), spec)
    steps = []
    for step in range(2):
        batches = micro_batches(step)
        ref_loss, ref_grads = reference_step(model, batches, spec)
        loss = float(runner.step(batches, label_tokens(batches)))
        errors, held = {}, []
        for stage in stages:
            for pname, param in stage.model.named_parameters():
                if not param.requires_grad:
                    continue
                held.append(pname)
                want = ref_grads[pname]
                got = param.grad if param.grad is not None else torch.zeros_like(want)
                errors[pname] = float((got - want).abs().max()) / max(float(want.abs().max()), 1e-30)
                param.grad = None
        steps.append({"loss": loss, "ref_loss": ref_loss, "errors": errors, "held": held,
                      "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad)})
    return {"rank": rank, "stages": indices, "steps": steps}


def main() -> None:
    out, names = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    env = init_distributed()
    results = {}
    for name in names:
        mine = run(name, env.rank, env.world_size)
        gathered = [None] * env.world_size
        dist.all_gather_object(gathered, mine)
        results[name] = gathered
    finish(env, out, results)


if __name__ == "__main__":
    main()
