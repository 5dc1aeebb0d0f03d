"""Loading memory and time to first step: the whole model in every process vs sharded loading.

A random Llama (about 300M parameters by default: hidden 1024, 25 layers) is saved by
``save_pretrained`` as three safetensors shards and fine-tuned by the real ``automodel finetune``
on 1, 2 and 4 processes (FSDP2), twice each:

* **before**: ``model.meta_init=false``, the old path -- every process loads the whole model,
  then shards it;
* **after**: the model is built on the meta device, sharded while empty, and each process reads
  only its own slices from the safetensors files.

Each run prints one ``weights:`` line (``training/model_setup.py``): the most parameter bytes
any process allocated, and the largest process's peak resident memory and its growth while the
model was built (the interpreter, torch and transformers are loaded before, so the growth leaves
the interpreter's baseline out). Time to first step is the time from launching the command to
the first line of ``metrics.jsonl`` (startup, data, model, one optimizer step).

The design targets: sharded loading's growth on 2 processes at most 0.6x, on 4 at most 0.35x of
the single-process load's growth (which holds the whole model either way). The step-1 loss of every run is checked against the
single-process whole load (1e-5): the same model trained whichever way it was loaded.

    python benchmarks/load_memory.py                       # 300M model, 1/2/4 processes
    python benchmarks/load_memory.py --layers 4 --procs 1,2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
WEIGHTS_LINE = re.compile(r"weights: (?P<how>.*) in (?P<seconds>[\d.]+) s; parameters per process: "
                          r"(?P<local>[\d.]+ \w+) of (?P<total>[\d.]+ \w+); host memory: peak (?P<peak>[\d.]+ \w+), "
                          r"\+(?P<growth>[\d.]+ \w+) while building")


def size(text: str) -> int:
    number, unit = text.split()
    return int(float(number) * UNITS[unit])


def save_model(directory: Path, args: argparse.Namespace) -> None:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from model_dirs import save_sharded_model, write_prompts

    save_sharded_model(directory / "model", shards=3, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=8, head_dim=64,
                       tie_word_embeddings=False)
    write_prompts(directory / "train.jsonl", 16)


def run(directory: Path, name: str, nproc: int, extra: list[str]) -> dict:
    out = directory / name
    command = [sys.executable, "-m", "automodel_cli", "finetune", f"model.path={directory / 'model'}",
               f"data.path={directory / 'train.jsonl'}", "train.max_steps=1", "train.global_batch_size=4",
               "train.micro_batch_size=1", "train.eval_every_steps=null", "logging.progress=false",
               "model.dtype=float32", "-o", str(out), *extra]
    if nproc > 1:
        command += ["--nproc-per-node", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first_step = None
    while process.poll() is None:
        metrics = out / "metrics.jsonl"
        if first_step is None and metrics.is_file() and metrics.stat().st_size:
            first_step = time.perf_counter() - start
        time.sleep(0.05)
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"{name} failed:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    found = WEIGHTS_LINE.search(stdout)
    assert found, stdout[-2000:]
    loss = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    return {"name": name, "nproc": nproc, "first_step_s": first_step or time.perf_counter() - start,
            "load_s": float(found["seconds"]), "local": size(found["local"]), "total": size(found["total"]),
            "peak": size(found["peak"]), "growth": size(found["growth"]), "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=25)
    parser.add_argument("--procs", default="1,2,4", help="process counts, comma-separated")
    parser.add_argument("--keep", type=Path, help="build the model here (or reuse it) instead of a temp dir")
    args = parser.parse_args()
    procs = [int(p) for p in args.procs.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        directory = args.keep or Path(tmp)
        if not (directory / "model" / "config.json").is_file():
            save_model(directory, args)
        print(f"command: python benchmarks/load_memory.py --hidden {args.hidden} --intermediate {args.intermediate} "
              f"--layers {args.layers} --procs {args.procs}")
        rows = []
        for nproc in procs:
            for mode, extra in (("before", ["model.meta_init=false"]), ("after", [])):
                row = run(directory, f"{mode}-{nproc}", nproc, extra)
                row["mode"] = mode
                rows.append(row)
                print(json.dumps(row), flush=True)  # each run as it ends
                for path in sorted((directory / row["name"]).glob("**/*"), reverse=True):  # free the disk
                    path.unlink() if path.is_file() or path.is_symlink() else path.rmdir()
        gib = 2**30
        print(f"model: {rows[0]['total'] / gib:.2f} GiB of fp32 parameters in 3 safetensors files")
        print("| processes | path | parameters allocated per process | peak RSS (largest process) | "
              "growth while loading | load time | time to first step | step-1 loss |")
        print("|---|---|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['nproc']} | {row['mode']} | {row['local'] / gib:.2f} GiB | {row['peak'] / gib:.2f} GiB | "
                  f"{row['growth'] / gib:.2f} GiB | {row['load_s']:.1f} s | {row['first_step_s']:.1f} s | "
                  f"{row['loss']:.6f} |")
        single = next(r for r in rows if r["nproc"] == 1 and r["mode"] == "before")
        one = next(r for r in rows if r["nproc"] == 1 and r["mode"] == "after")
        for row in rows:
            if row["mode"] == "after" and row["nproc"] > 1:
                target = {2: 0.6, 4: 0.35}.get(row["nproc"])
                ratio = row["growth"] / one["growth"]
                verdict = "" if target is None else f" (target <= {target}: {'met' if ratio <= target else 'MISSED'})"
                print(f"{row['nproc']} processes, sharded loading: growth {ratio:.2f}x the single-process "
                      f"load's{verdict}")
        worst = max(abs(r["loss"] - single["loss"]) for r in rows)
        print(f"step-1 loss: largest difference from the single-process whole load {worst:.2e} "
              f"({'within' if worst <= 1e-5 else 'OUTSIDE'} 1e-5)")


if __name__ == "__main__":
    main()
