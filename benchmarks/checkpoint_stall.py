"""How long a checkpoint stops training: blocking saves against ``checkpoint.async=true``.

A randomly initialised Llama (134M parameters at the defaults, fp32, AdamW: about 1.5 GiB of
model and optimizer shards per checkpoint) trains on random tokens in one process on CPU and
saves a checkpoint every ``--every`` steps, once with blocking saves and once in the background.
Checkpoints are taken by the training loop's own ``loop.Checkpoints``: a background checkpoint
is published at the first step boundary after its writes are done, at the latest before the
next save, and the last one after the loop.

The stall is the wall time the loop spends in ``Checkpoints`` (after each step and at the end),
divided by the number of checkpoints. In the background mode it is the copy to host memory plus
the small files, the publishing, and whatever is still being written when a save or the end
comes. The threads
writing in the background share the CPU with training, so the steps taken meanwhile are slower;
the total wall time of the run is printed too. The run goes on for a few steps after the last
checkpoint, as a real run would, so that its write can overlap training too.

Usage: python benchmarks/checkpoint_stall.py [--hidden 768] [--layers 12] [--steps 15] [--every 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def build(hidden: int, layers: int, vocab: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=vocab,
                         max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, optimizer


def run(background: bool, args, run_dir: Path) -> dict:
    from types import SimpleNamespace

    import torch

    from automodel_cli.training.loop import Checkpoints

    model, optimizer = build(args.hidden, args.layers, args.vocab, seed=0)
    cfg = SimpleNamespace(checkpoint=SimpleNamespace(keep=2, **{"async": background}))
    checkpoints = Checkpoints(cfg, run_dir, model=model, optimizer=optimizer, scheduler=None, tokenizer=None)
    generator = torch.Generator().manual_seed(1)
    stalled = 0.0  # seconds in checkpoint code
    steps: list[float] = []  # seconds per step, checkpoint code excluded

    run_started = time.perf_counter()
    for step in range(1, args.steps + 1):
        started = time.perf_counter()
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        computed = time.perf_counter()
        checkpoints.at_step(step, save_now=step % args.every == 0, stopping=False, train_state=dict)
        stalled += time.perf_counter() - computed
        steps.append(computed - started)
    closing = time.perf_counter()
    checkpoints.close()
    stalled += time.perf_counter() - closing
    return {"stall": stalled / (args.steps // args.every), "total": time.perf_counter() - run_started,
            "step": sorted(steps)[len(steps) // 2]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--every", type=int, default=4)
    args = parser.parse_args()

    import warnings

    import torch

    warnings.filterwarnings("ignore")
    model, _ = build(args.hidden, args.layers, args.vocab, seed=0)
    params = sum(p.numel() for p in model.parameters())
    del model
    print(f"command: python benchmarks/checkpoint_stall.py --hidden {args.hidden} --layers {args.layers} "
          f"--vocab {args.vocab} --batch {args.batch} --seq {args.seq} --steps {args.steps} --every {args.every}")
    print(f"model: {params / 1e6:.0f}M parameters, fp32 + AdamW: about {params * 12 / 2**30:.2f} GiB per checkpoint; "
          f"{torch.get_num_threads()} CPU threads")
    results = {}
    for name, background in (("sync", False), ("async", True)):
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = result = run(background, args, Path(tmp) / "run")
        print(f"{name:5s}  stalled per checkpoint {result['stall']:6.2f} s;  median step {result['step']:.2f} s "
              f"(checkpoint code excluded);  whole run {result['total']:.1f} s")
    print(f"stall ratio sync / async: {results['sync']['stall'] / results['async']['stall']:.1f}x;  "
          f"whole run sync / async: {results['sync']['total'] / results['async']['total']:.2f}x")


if __name__ == "__main__":
    main()
