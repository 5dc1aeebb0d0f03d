"""The memory plan against the measured peak of `automodel benchmark` on CPU.

Usage::

    python benchmarks/memory_plan.py                       # full, LoRA, activation checkpointing
    python benchmarks/memory_plan.py --runs full,lora --hidden 512 --layers 4

A Llama of ``--hidden`` x ``--layers`` (vocabulary ``--vocab``, untied head, grouped-query
attention) exists only as a ``config.json``; every run trains it from random weights
(``model.from_scratch=true``), fp32 on CPU, with ``automodel benchmark`` (synthetic tokens, every
position trained, ``masked_ce``, 1 warm-up step and 1 timed step, so the optimizer state exists
during the second step). Runs:

- ``full``: full fine-tuning;
- ``lora``: ``--peft lora`` (r=8, all linear layers of the decoder);
- ``ac``: full fine-tuning with ``train.activation_checkpointing=full``;
- ``lora-ac``: both.

Each run is its own process. It imports torch, transformers and the recipe first, then reads its
anonymous resident memory (``RssAnon``: memory it owns; mapped library pages are not counted) and
runs ``automodel benchmark`` in-process while a thread samples ``RssAnon`` every 2 ms. The measured
peak growth is the largest sample minus that baseline: everything the run allocates (weights,
gradients, AdamW state, activations, logits, the allocator's slack). The plan is
``automodel plan --recipe benchmark ... --json`` with the same arguments; the script prints
plan / measured for each run (docs/memory.md: the plan should be within 25% of it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

RUNS = {
    "full": [],
    "lora": ["--peft", "lora"],
    "ac": ["train.activation_checkpointing=full"],
    "lora-ac": ["--peft", "lora", "train.activation_checkpointing=full"],
}

CHILD = textwrap.dedent("""
    import json, sys, threading, time
    import torch, transformers  # noqa: F401  (imported before the baseline)
    import transformers.models.llama.modeling_llama  # noqa: F401
    import peft  # noqa: F401
    from automodel_cli.cli import main
    torch.set_num_threads(int(sys.argv[1]))

    def anonymous_rss():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024

    before = anonymous_rss()
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anonymous_rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    code = main(["benchmark", *sys.argv[2:]])
    done.set()
    sampler.join()
    print("MEASURED " + json.dumps({"code": code, "grown_bytes": peak[0] - before}), flush=True)
""")


def write_model(directory: Path, args: argparse.Namespace) -> None:
    """The model: a Llama config.json, no weights."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads // 2,
                max_position_embeddings=args.seq, tie_word_embeddings=False, use_cache=False
                ).save_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default="full,lora,ac,lora-ac")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    print(f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{args.threads} torch threads")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        write_model(model, args)
        common = [f"model.path={model}", "model.from_scratch=true", f"benchmark.batch_size={args.batch}",
                  f"benchmark.seq_len={args.seq}", "benchmark.warmup_steps=1", "benchmark.steps=1"]
        print(f"model: Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
              f"{args.heads} heads ({args.heads // 2} kv), vocab {args.vocab}, untied; {args.batch} x {args.seq} tokens")
        for name in args.runs.split(","):
            arguments = common + RUNS[name]
            planned = subprocess.run([sys.executable, "-m", "automodel_cli", "plan", "--recipe", "benchmark", "--json",
                                      *arguments], capture_output=True, text=True, check=True)
            plan = json.loads(planned.stdout)
            child = subprocess.run([sys.executable, "-c", CHILD, str(args.threads), *arguments, "--json"],
                                   capture_output=True, text=True)
            measured = [line for line in child.stdout.splitlines() if line.startswith("MEASURED ")]
            if child.returncode or not measured:
                sys.exit(f"{name}: the benchmark failed:\n{child.stderr[-3000:]}")
            grown = json.loads(measured[-1].removeprefix("MEASURED "))["grown_bytes"]
            peak = plan["bytes"]["peak"]
            rows.append((name, plan, grown))
            print(f"{name:<8} plan {peak / 2**20:8.1f} MiB ({plan['phase']}), measured {grown / 2**20:8.1f} MiB, "
                  f"plan/measured {peak / grown:.3f}", flush=True)
    print("\n| run | plan MiB | phase | measured peak growth MiB | plan / measured |\n|---|---|---|---|---|")
    for name, plan, grown in rows:
        print(f"| {name} | {plan['bytes']['peak'] / 2**20:.1f} | {plan['phase']} | {grown / 2**20:.1f} | "
              f"{plan['bytes']['peak'] / grown:.3f} |")


if __name__ == "__main__":
    main()
