"""Pipeline bubble on CPU: the measured idle fraction of a 2-stage pipeline vs the schedule's theory.

Usage::

    python benchmarks/pipeline_bubble.py                    # m = 2, 4, 8; GPipe and 1F1B; about a minute
    python benchmarks/pipeline_bubble.py --micro-batches 1,2,4,8,16 --seq 512

Two processes (torchrun, gloo, 1 torch thread each, pp=2) drive the pipeline component
(``automodel_cli/components/distributed/pipeline.py``) as the recipes do: a random-init Llama
(hidden 256, MLP 688, ``--layers`` layers, vocabulary 2048, float32) is cut by ``split_points``,
each rank keeps its stage (``build_stage_module``: the embedding and the first half of the layers,
or the second half with the final norm, LM head and loss), and ``PipelineRunner.step`` runs one
optimizer step's forward and backward of ``m`` micro-batches of ``--rows x --seq`` random tokens
(no optimizer update: the bubble is a property of forward and backward).

* ``T_m``: the wall time of ``PipelineRunner.step`` (both ranks start at a barrier; the slower
  rank's time), the median of ``--steps`` steps after one warm-up step.
* ``t``: the time of one stage's forward and backward of one micro-batch on its own (the first
  stage from token ids with a random output gradient, the last from hidden states that need a
  gradient, through its loss), the median of ``--repeats``; both ranks time their stages at the
  same time, as both cores are busy in the pipeline's steady state. The slower stage bounds the
  pipeline, so ``t`` is the larger of the two.
* measured bubble = ``1 - m * t / T_m``: the fraction of the step a rank of the slower stage is
  not computing. Theory for GPipe and 1F1B with ``p`` stages of equal cost and free
  communication: ``(p - 1) / (m + p - 1)``. With two stages of unequal cost ``t_slow`` and
  ``t_fast`` the step is at least ``m x t_slow + t_fast`` (the fast stage fills and drains the
  pipeline), so the bubble of the slower stage is ``t_fast / (m x t_slow + t_fast)``: printed as
  "theory, measured stages".

The measured value also contains what theory leaves out: the gloo sends and receives of
activations and gradients, the schedule's bookkeeping and any imbalance between the stages.
CPU timing on a shared machine moves by several percent from run to run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE = dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2,
             head_dim=64, max_position_embeddings=4096, use_cache=False, tie_word_embeddings=False)
SCHEDULES = ("gpipe", "1f1b")
STAGES = 2


def micro_batches(args, count: int, seed: int) -> list[dict]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(3, SHAPE["vocab_size"], (args.rows, args.seq), generator=generator)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def stage_alone(stage, args, label_tokens: int) -> float:
    """Median seconds of this stage's forward and backward of one micro-batch, no pipeline."""
    import torch

    batch = micro_batches(args, 1, 7)[0]
    stage.num_label_tokens = label_tokens
    times = []
    for _ in range(args.repeats + 1):
        start = time.perf_counter()
        if stage.is_first:
            hidden = stage(batch["input_ids"])
            hidden.backward(torch.randn_like(hidden))
        else:
            hidden = torch.randn(args.rows, args.seq, SHAPE["hidden_size"], requires_grad=True)
            stage(hidden, labels=batch["labels"]).backward()
        times.append(time.perf_counter() - start)
        stage.model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from automodel_cli.components.distributed.env import destroy, init_distributed
    from automodel_cli.components.distributed.pipeline import PipelineRunner, build_stage_module, split_points
    from automodel_cli.components.loss.builtin import MASKED_CE

    torch.set_num_threads(1)
    env = init_distributed()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=args.layers, **SHAPE)).train()
    ranges = split_points(args.layers, STAGES)
    stage = build_stage_module(model, env.rank, STAGES, ranges[env.rank])
    label_tokens = args.rows * (args.seq - 1)
    stage.set_loss(MASKED_CE)
    dist.barrier()
    alone = stage_alone(stage, args, label_tokens)
    stage_times = [None] * STAGES
    dist.all_gather_object(stage_times, alone)
    results = {"stage_s": stage_times, "layers": [list(r) for r in ranges], "steps": {}}
    for schedule in SCHEDULES:
        runner = PipelineRunner([stage], dist.group.WORLD, schedule, torch.device("cpu"), MASKED_CE)
        for count in args.micro_batches:
            batches = micro_batches(args, count, count)
            times = []
            for _ in range(args.steps + 1):
                dist.barrier()
                start = time.perf_counter()
                runner.step(batches, count * label_tokens)
                times.append(time.perf_counter() - start)
                stage.model.zero_grad(set_to_none=True)
            gathered = [None] * STAGES
            dist.all_gather_object(gathered, times[1:])
            step_times = [max(per_rank) for per_rank in zip(*gathered)]
            results["steps"][f"{schedule}/{count}"] = statistics.median(step_times)
    if env.is_main:
        Path(args.out).write_text(json.dumps(results))
    dist.barrier()
    destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro-batches", default="2,4,8", help="micro-batch counts m")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rows", type=int, default=1, help="rows per micro-batch")
    parser.add_argument("--seq", type=int, default=256, help="tokens per row")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per (schedule, m), after one warm-up")
    parser.add_argument("--repeats", type=int, default=10, help="timed forward+backward of one stage alone")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.micro_batches = [int(m) for m in str(args.micro_batches).split(",")]
    if args.worker:
        worker(args)
        return
    import torch

    print(f"Llama hidden {SHAPE['hidden_size']}, {args.layers} layers, vocabulary {SHAPE['vocab_size']}, float32; "
          f"pp={STAGES} (2 processes, gloo, 1 thread each); micro-batches of {args.rows} x {args.seq} tokens; "
          f"torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pp.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={STAGES}",
                   __file__, "--worker", "--out", str(out), "--micro-batches", ",".join(map(str, args.micro_batches)),
                   "--layers", str(args.layers), "--rows", str(args.rows), "--seq", str(args.seq),
                   "--steps", str(args.steps), "--repeats", str(args.repeats)]
        subprocess.run(command, check=True, env=env, cwd=Path(__file__).resolve().parents[1])
        result = json.loads(out.read_text())
    first, last = result["stage_s"]
    t = max(first, last)
    print(f"one micro-batch forward+backward alone: stage 0 (layers {result['layers'][0][0]}-"
          f"{result['layers'][0][-1]} + embedding) {1000 * first:.1f} ms, stage 1 (layers {result['layers'][1][0]}-"
          f"{result['layers'][1][-1]} + head and loss) {1000 * last:.1f} ms; t = {1000 * t:.1f} ms")
    print("\n| schedule | m | T_m s | m x t s | measured bubble | theory (p-1)/(m+p-1) | theory, measured stages |")
    print("|---|---|---|---|---|---|---|")
    for schedule in SCHEDULES:
        for count in args.micro_batches:
            step = result["steps"][f"{schedule}/{count}"]
            measured = 1 - count * t / step
            theory = (STAGES - 1) / (count + STAGES - 1)
            print(f"| {schedule} | {count} | {step:.3f} | {count * t:.3f} | {measured:.3f} | {theory:.3f} | "
                  f"{min(first, last) / (count * t + min(first, last)):.3f} |")


if __name__ == "__main__":
    main()
