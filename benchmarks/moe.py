"""Mixture-of-experts training steps on CPU: the experts kernels, and the cost of expert parallelism.

Usage::

    python benchmarks/moe.py                 # both parts, about two minutes on 2 cores
    python benchmarks/moe.py --skip-ep       # kernels only

The model is a random-init Qwen3-MoE (16 experts, top-4, hidden 512, expert MLP 256, 4 layers,
8 heads, vocabulary 2048), float32, trained on random tokens (batch x sequence tokens per step).
One training step = forward, loss, backward, ``AdamW.step()``, ``zero_grad``; ``--warmup`` steps,
then ``--steps`` timed.

1. Kernels, one process: Hugging Face's eager experts loop (``config._experts_implementation =
   "eager"``: one gather, two matrix products and an ``index_add_`` per expert) against the
   forward automodel installs with ``model.experts_kernel=grouped_mm`` and ``=loop``, and
   transformers' own grouped path (``"grouped_mm"``, its default where torch has the kernel).
   Tokens/s and the ratio to eager are printed.
2. Expert parallelism, two processes (torchrun, gloo): each process trains on its own tokens with
   all 16 experts (ep=1) or with 8 of them, the tokens of the other 8 sent to the other process
   and back (ep=2, all-to-all). Step time and the time spent in the all-to-alls (counts and rows,
   forward and backward) are printed. The processes do not synchronise gradients here (no FSDP):
   the difference between the two is the exchange, not data-parallel reductions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE = dict(vocab_size=2048, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             head_dim=64, intermediate_size=1024, moe_intermediate_size=256, num_experts=16, num_experts_per_tok=4,
             norm_topk_prob=True, max_position_embeddings=1024, use_cache=False, tie_word_embeddings=False)


def build(seed: int = 0):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **SHAPE))
    return model.train()


def timed_steps(model, batches, warmup: int, foreach: bool = True) -> float:
    """Seconds per training step over ``batches[warmup:]``."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=foreach)
    elapsed = 0.0
    for index, ids in enumerate(batches):
        start = time.perf_counter()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index >= warmup:
            elapsed += time.perf_counter() - start
    return elapsed / (len(batches) - warmup)


def batches(args, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, SHAPE["vocab_size"], (args.batch, args.seq), generator=generator)
            for _ in range(args.warmup + args.steps)]


def kernels(args) -> dict[str, float]:
    from automodel_cli.components.moe.experts import HF_FUSED, install_experts

    data = batches(args, 0)
    tokens = args.batch * args.seq
    out = {}
    for name in ("eager", "hf_grouped_mm", "grouped_mm", "loop"):
        model = build()
        if name == "eager":
            model.config._experts_implementation = "eager"
        elif name == "hf_grouped_mm":  # transformers' own grouped path, its default where torch has the kernel
            model.config._experts_implementation = "grouped_mm"
        else:
            install_experts(model, [HF_FUSED], name)
        out[name] = tokens / timed_steps(model, data, args.warmup)
        print(f"  {name:<13} {out[name]:9.0f} tokens/s  ({out[name] / out['eager']:.2f}x eager)", flush=True)
    return out


def ep_worker(args) -> None:
    """One of two torchrun processes: ep=1 and ep=2 steps on this rank's tokens."""
    import torch
    import torch.distributed as dist

    from automodel_cli.components.distributed.mesh import MeshShape, build_mesh
    from automodel_cli.components.moe import dispatch
    from automodel_cli.components.moe.experts import HF_FUSED, install_experts

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    exchange_seconds = [0.0]
    original = dispatch._exchange

    class Timed(torch.autograd.Function):
        """Times the all-to-all of rows in forward and (through its own backward) in backward."""

        @staticmethod
        def forward(ctx, tensor, output_sizes, input_sizes, group):
            ctx.sizes, ctx.group = (output_sizes, input_sizes), group
            start = time.perf_counter()
            with torch.no_grad():
                out = original(tensor, output_sizes, input_sizes, group).clone()
            exchange_seconds[0] += time.perf_counter() - start
            return out

        @staticmethod
        def backward(ctx, grad):
            start = time.perf_counter()
            out = original(grad.contiguous(), ctx.sizes[1], ctx.sizes[0], ctx.group).clone()
            exchange_seconds[0] += time.perf_counter() - start
            return out, None, None, None

    dispatch._exchange = lambda tensor, out_sizes, in_sizes, group: Timed.apply(tensor, out_sizes, in_sizes, group)
    mesh = build_mesh(MeshShape(1, 2, 1, ep=2), "cpu")
    data = batches(args, 1 + rank)
    tokens = args.batch * args.seq
    result = {}
    for ep in (1, 2):
        model = build()
        install_experts(model, [HF_FUSED], "grouped_mm")
        if ep > 1:
            dispatch.shard_experts(model, mesh, ep)
        exchange_seconds[0] = 0.0
        dist.barrier()
        # foreach=False: without FSDP the plain weights and the experts' DTensors cannot share one
        # foreach kernel (under FSDP every parameter is a DTensor)
        seconds = timed_steps(model, data, args.warmup, foreach=False)
        times = [None, None]
        dist.all_gather_object(times, (seconds, exchange_seconds[0] / (args.warmup + args.steps)))
        result[f"ep{ep}"] = {"step_s": max(t[0] for t in times), "exchange_s": max(t[1] for t in times),
                             "tokens_per_s": 2 * tokens / max(t[0] for t in times)}
    if rank == 0:
        Path(args.out).write_text(json.dumps(result))
    dist.destroy_process_group()


def expert_parallelism(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ep.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "CUDA_VISIBLE_DEVICES": ""}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
                   "--ep-worker", "--out", str(out), "--batch", str(args.batch), "--seq", str(args.seq),
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
        subprocess.run(command, check=True, env=env, cwd=Path(__file__).resolve().parents[1])
        result = json.loads(out.read_text())
    for name, row in result.items():
        print(f"  {name}: {row['step_s']:.3f} s/step, {row['tokens_per_s']:.0f} tokens/s over 2 processes, "
              f"all-to-all {row['exchange_s']:.3f} s/step ({100 * row['exchange_s'] / row['step_s']:.0f}%)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--skip-ep", action="store_true")
    parser.add_argument("--ep-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.ep_worker:
        ep_worker(args)
        return
    print(f"Qwen3-MoE {SHAPE['num_experts']} experts top-{SHAPE['num_experts_per_tok']}, hidden "
          f"{SHAPE['hidden_size']}, {SHAPE['num_hidden_layers']} layers; {args.batch} x {args.seq} tokens per step "
          f"per process, {args.threads} thread(s), torch {torch.__version__}")
    print("experts kernels (1 process):")
    kernels(args)
    if not args.skip_ep:
        print("expert parallelism (2 processes, gloo, grouped_mm):")
        expert_parallelism(args)


if __name__ == "__main__":
    main()
