"""Peak memory of QLoRA, LoRA and full fine-tuning on CPU, and AdamW's vs 8-bit AdamW's state.

Usage::

    python benchmarks/quantization_memory.py                          # ~0.35B Llama, 4 runs + optimizer
    python benchmarks/quantization_memory.py --layers 2 --hidden 256 --intermediate 704   # a quick look

Part 1. A random Llama (hidden 1024, MLP 2816, 24 layers, 16 heads / 8 kv heads of 64, an untied
32000-token vocabulary: 0.35B parameters by default) is saved by ``save_pretrained`` as three
safetensors files, once, with the demo tokenizer and a small synthetic chat file. The real
``automodel finetune`` trains it for 5 steps (1 process, fp32 weights on CPU, micro-batch 1,
samples of ``--seq`` tokens) four ways:

- ``full``: full fine-tuning (AdamW);
- ``lora``: ``--peft lora`` (r=8 on every linear layer of the decoder);
- ``qlora-nf4``: ``--peft qlora`` (the decoder's linear weights NF4, read and quantized tensor by
  tensor while the model is built on the meta device);
- ``qlora-int8``: ``--peft qlora peft.quantization=int8``.

Each run is its own process tree; its peak is the ``ru_maxrss`` ``os.wait4`` returns for it (the
largest resident set of the process, imports, loading and the 5 steps included). The run's own
memory plan (the first lines it prints) is shown beside it: its ``peak`` line, per process.

Part 2. The optimizer state of ``optim.name=adamw`` vs ``optim.name=adamw8bit`` (bitsandbytes'
AdamW8bit, built by the same registry functions the recipe calls) on the same architecture with
``--opt-layers`` layers, full fine-tuning, in-process: the bytes of every tensor in
``optimizer.state`` after one step. Skipped (and said so) when bitsandbytes is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = {
    "full": [],
    "lora": ["--peft", "lora"],
    "qlora-nf4": ["--peft", "qlora"],
    "qlora-int8": ["--peft", "qlora", "peft.quantization=int8"],
}
PLAN_PEAK = re.compile(r"^\s*peak\s+(?P<value>[\d.]+) GiB", re.MULTILINE)  # the plan's peak line
WORDS = "the of model data weight memory train step layer token block scale adapter quantize host page".split()


def architecture(args: argparse.Namespace, layers: int) -> dict:
    return {"hidden_size": args.hidden, "intermediate_size": args.intermediate, "num_hidden_layers": layers,
            "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": args.hidden // 16,
            "vocab_size": args.vocab, "max_position_embeddings": max(512, args.seq), "tie_word_embeddings": False}


def save_fixture(directory: Path, args: argparse.Namespace) -> None:
    """The model (three safetensors files, demo tokenizer) and chat samples longer than ``--seq``
    tokens (the demo tokenizer is byte-level: a character is about a token), truncated to it."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from model_dirs import save_sharded_model

    save_sharded_model(directory / "model", shards=3, **architecture(args, args.layers))
    rng = random.Random(0)
    with (directory / "train.jsonl").open("w") as handle:
        for _ in range(8):
            text = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
            handle.write(json.dumps({"messages": [{"role": "user", "content": text(8)},
                                                  {"role": "assistant", "content": text(args.seq // 5)}]}) + "\n")


def finetune(directory: Path, name: str, args: argparse.Namespace) -> dict:
    """One ``automodel finetune`` run: its tree's peak RSS (``os.wait4``), plan peak and losses."""
    out = directory / name
    command = [sys.executable, "-m", "automodel_cli", "finetune", f"model.path={directory / 'model'}",
               f"data.path={directory / 'train.jsonl'}", f"data.max_length={args.seq}",
               f"train.max_steps={args.steps}", "train.global_batch_size=1", "train.micro_batch_size=1",
               "train.eval_every_steps=null", "logging.progress=false", "model.dtype=float32", "-o", str(out),
               *RUNS[name]]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        log.seek(0)
        output = log.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed (exit {os.waitstatus_to_exitcode(status)}):\n$ {' '.join(command)}\n"
                         f"{output[-4000:]}")
    plan = PLAN_PEAK.search(output)
    plan_mib = None if plan is None else float(plan["value"]) * 1024
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    return {"name": name, "peak_mib": usage.ru_maxrss / 1024, "plan_mib": plan_mib, "seconds": seconds,
            "losses": losses}


def tensor_bytes(value: object) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    return 0


def optimizer_state(args: argparse.Namespace) -> list[dict] | str:
    """Bytes of the optimizer state after one step, adamw and adamw8bit, on one random model."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        return f"bitsandbytes is not installed ({exc}): adamw8bit skipped"
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from automodel_cli.assets import demo_dir
    from automodel_cli.components.optim import optimizers
    from automodel_cli.components.optim.build import OptimizerSettings

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(demo_dir(),
                                                                        **architecture(args, args.opt_layers)))
    n_params = sum(p.numel() for p in model.parameters())
    input_ids = torch.randint(0, args.vocab, (1, args.seq), generator=torch.Generator().manual_seed(1))
    rows = []
    for name in ("adamw", "adamw8bit"):
        settings = OptimizerSettings(model=model, lr=1e-5, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
        optimizer = getattr(optimizers, name)(settings)
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state = sum(tensor_bytes(s) for s in optimizer.state.values())
        dtypes = sorted({str(v.dtype).removeprefix("torch.") for s in optimizer.state.values() for v in s.values()
                         if isinstance(v, torch.Tensor)})
        rows.append({"name": name, "params": n_params, "state_bytes": state, "bytes_per_param": state / n_params,
                     "dtypes": dtypes})
        del optimizer
    return rows


def machine_line() -> str:
    import torch
    import transformers

    cpu = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return (f"machine: {cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; python "
            f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    parser.add_argument("--opt-layers", type=int, default=4, help="layers of the model of part 2")
    parser.add_argument("--keep", type=Path, help="build the model here (or reuse it) instead of a temp dir")
    args = parser.parse_args()
    names = [n for n in args.runs.split(",") if n]
    if set(names) - set(RUNS):
        parser.error(f"unknown run(s) {sorted(set(names) - set(RUNS))}; choose from {', '.join(RUNS)}")

    print("$ " + " ".join(["python", *sys.argv]))
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.keep or Path(tmp)
        if not (directory / "model" / "config.json").is_file():
            save_fixture(directory, args)
        weights = sum(p.stat().st_size for p in (directory / "model").glob("*.safetensors"))
        print(f"model: Llama, hidden {args.hidden}, MLP {args.intermediate}, {args.layers} layers, vocabulary "
              f"{args.vocab} (untied); {weights / 4 / 1e9:.3f}B parameters, {weights / 2**30:.2f} GiB fp32 "
              f"safetensors; {args.steps} steps of 1 x {args.seq} tokens", flush=True)
        rows = {}
        for name in names:
            rows[name] = finetune(directory, name, args)
            row = rows[name]
            print(f"  {name:10s} peak RSS {row['peak_mib']:7.0f} MiB  plan {row['plan_mib'] or float('nan'):7.0f} MiB"
                  f"  {row['seconds']:5.0f} s  losses {', '.join(f'{x:.4f}' for x in row['losses'])}", flush=True)
            for path in sorted((directory / name).glob("**/*"), reverse=True):  # free the disk
                path.unlink() if path.is_file() or path.is_symlink() else path.rmdir()

    print()
    print("| run | peak RSS MiB | vs full | vs lora | plan peak MiB | plan / measured | time s |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        vs = {peer: f"{row['peak_mib'] / rows[peer]['peak_mib']:.2f}x" if peer in rows else "" for peer in ("full", "lora")}
        plan = f"{row['plan_mib']:.0f}" if row["plan_mib"] else "?"
        ratio = f"{row['plan_mib'] / row['peak_mib']:.2f}" if row["plan_mib"] else "?"
        print(f"| {name} | {row['peak_mib']:.0f} | {vs['full']} | {vs['lora']} | {plan} | {ratio} | "
              f"{row['seconds']:.0f} |")

    print()
    state = optimizer_state(args)
    if isinstance(state, str):
        print(state)
        return
    print(f"optimizer state after one step, full fine-tuning, {args.opt_layers} layers "
          f"({state[0]['params'] / 1e6:.1f}M parameters):")
    print("| optim.name | state MiB | bytes per parameter | state dtypes |")
    print("|---|---|---|---|")
    for row in state:
        print(f"| {row['name']} | {row['state_bytes'] / 2**20:.1f} | {row['bytes_per_param']:.3f} | "
              f"{', '.join(row['dtypes'])} |")
    print(f"adamw8bit / adamw: {state[1]['state_bytes'] / state[0]['state_bytes']:.3f}")


if __name__ == "__main__":
    main()
