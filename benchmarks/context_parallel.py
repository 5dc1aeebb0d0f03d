"""Context parallelism on CPU: the longest sequence a fixed per-process memory budget trains.

Usage::

    python benchmarks/context_parallel.py                       # cp=1 and cp=2, about three minutes on 2 cores
    python benchmarks/context_parallel.py --cps 1,2,4 --budget-mib 400

Every measurement is a real ``automodel pretrain`` run: the bundled demo corpus and character
tokenizer, a random-init Llama built from the demo's config with ``model.config`` overrides
(hidden 256, MLP 688, 4 layers, 4 heads of 64, float32), one block of ``data.max_length=L``
tokens per step, 2 optimizer steps, no validation, ``--nproc-per-node cp distributed.cp=cp``
(cp=1 runs in one process, without torchrun).

Memory measure: the growth of the largest process's peak resident memory during training,
``peak_total - peak_built``.

* ``peak_total`` is the kernel's high-water mark (``ru_maxrss``) of the largest process of the
  run, read with ``os.wait4`` on the launched command: Linux reports for a reaped child the
  largest ``maxrss`` of it and every descendant it reaped, so this is the largest training
  process's whole-life peak (torchrun and the launcher hold far less than a worker). It is exact
  (no sampling) and needs nothing from the product.
* ``peak_built`` is the same high-water mark at the moment the model is built, from the run's
  ``weights:`` line ("host memory: peak ..., largest process"): the interpreter, torch, the data
  and the model, which do not depend on how long a sequence is.

The difference is what a training step adds: activations, gradients, AdamW state and the
allocator's slack (the run's final save of the tiny model adds nothing against those). The
longest length whose growth fits ``--budget-mib`` is found by doubling ``L`` from ``--start``
until a run no longer fits, then bisecting to ``--resolution`` tokens. Lengths are multiples of
``2 x cp`` (pretrain blocks under cp must be). A length for which the run fails (for instance
killed for memory) counts as not fitting.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
BUILT_PEAK = re.compile(r"^weights: .*host memory: peak (?P<peak>[\d.]+ \w+),", re.MULTILINE)
MODEL = ["model.config.hidden_size=256", "model.config.intermediate_size=688", "model.config.num_hidden_layers=4",
         "model.config.num_attention_heads=4", "model.config.num_key_value_heads=2", "model.config.head_dim=64",
         "model.config.max_position_embeddings=1048576"]


def size(text: str) -> int:
    number, unit = text.split()
    return int(float(number) * UNITS[unit])


def measure(cp: int, length: int, out_root: Path) -> dict:
    """One ``automodel pretrain`` run: its step growth of peak RSS (MiB) and wall time."""
    out = out_root / f"cp{cp}-L{length}"
    command = [sys.executable, "-m", "automodel_cli", "pretrain", "demo", f"data.max_length={length}",
               "data.eval_path=null", "train.max_steps=2", "train.global_batch_size=1", "train.micro_batch_size=1",
               "train.eval_every_steps=null", "logging.progress=false", "model.dtype=float32", *MODEL, "-o", str(out)]
    if cp > 1:
        command += ["--nproc-per-node", str(cp), f"distributed.cp={cp}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    built = BUILT_PEAK.search(output)
    if process.returncode != 0 or built is None:
        tail = "\n".join(output.splitlines()[-5:])
        print(f"    cp={cp} L={length}: run failed (exit {process.returncode}), counted as not fitting:\n{tail}")
        return {"ok": False, "seconds": seconds}
    peak_total = usage.ru_maxrss * 1024
    peak_built = size(built["peak"])
    return {"ok": True, "seconds": seconds, "peak_mib": peak_total / 2**20,
            "built_mib": peak_built / 2**20, "growth_mib": (peak_total - peak_built) / 2**20}


def longest(cp: int, args: argparse.Namespace, out_root: Path) -> dict:
    """Double, then bisect, the sequence length until the step's growth meets the budget."""
    unit = 2 * cp
    seen: dict[int, dict] = {}

    def fits(length: int) -> bool:
        row = seen[length] = measure(cp, length, out_root)
        verdict = row["ok"] and row["growth_mib"] <= args.budget_mib
        if row["ok"]:
            print(f"    cp={cp} L={length:6d}: peak {row['peak_mib']:7.1f} MiB, built {row['built_mib']:6.1f} MiB, "
                  f"step growth {row['growth_mib']:7.1f} MiB ({'fits' if verdict else 'over'}), "
                  f"{row['seconds']:.0f} s", flush=True)
        return verdict

    low, high = 0, args.start
    while fits(high):
        low, high = high, high * 2
    while high - low > max(args.resolution, unit):
        middle = (low + high) // 2 // unit * unit
        if fits(middle):
            low = middle
        else:
            high = middle
    return {"cp": cp, "longest": low, "first_over": high, "runs": len(seen), "row": seen.get(low),
            "seconds": sum(r["seconds"] for r in seen.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-mib", type=float, default=500.0,
                        help="per-process budget for the peak RSS growth of training")
    parser.add_argument("--cps", default="1,2", help="context-parallel degrees to compare")
    parser.add_argument("--start", type=int, default=1024, help="first length tried (a multiple of 2 x cp)")
    parser.add_argument("--resolution", type=int, default=256, help="bisection stops at this many tokens")
    args = parser.parse_args()
    import torch

    print(f"Llama hidden 256, 4 layers, 4 heads of 64, float32, pretrain of 1 x L tokens per step; budget "
          f"{args.budget_mib:.0f} MiB of peak RSS growth per process; 1 torch thread per process, torch {torch.__version__}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for cp in (int(c) for c in args.cps.split(",")):
            print(f"  cp={cp}:", flush=True)
            results.append(longest(cp, args, Path(tmp)))
    print("\n| cp | processes | longest L within budget | first L over | growth at longest, MiB | runs | seconds |")
    print("|---|---|---|---|---|---|---|")
    for result in results:
        row = result["row"]
        growth = f"{row['growth_mib']:.1f}" if row else "-"
        print(f"| {result['cp']} | {result['cp']} | {result['longest']} | {result['first_over']} | {growth} | "
              f"{result['runs']} | {result['seconds']:.0f} |")
    base = results[0]["longest"]
    for result in results[1:]:
        if base:
            print(f"cp={result['cp']} / cp={results[0]['cp']} longest length: {result['longest'] / base:.2f}x")


if __name__ == "__main__":
    main()
