"""Vision-language fine-tuning throughput and peak memory: ``automodel finetune`` against TRL's
``SFTTrainer`` on the same tiny Gemma 3 VLM, images and data.

Usage::

    python benchmarks/vlm_vs_trl.py                   # 30 steps, 3 repeats, full FT and LoRA
    python benchmarks/vlm_vs_trl.py --quick           # smoke run: 12 steps, 1 repeat
    python benchmarks/vlm_vs_trl.py --runs ours-full,trl-full --threads 1

The structure, timing and memory probes are those of ``finetune_vs_trl.py`` (read its docstring
for the metric definitions: tokens/s over the steps after ``--warmup``, ``tok/CPU-s``, peak RSS of
each run's own fresh process, runs interleaved, busy-machine re-runs); this script imports them.

Same inputs. A temporary directory gets a random-init Gemma 3 (``tiny_vlm.build_gemma3_vlm``:
text decoder hidden 256, 4 layers; 2-layer SigLIP tower on 56-pixel images, 16 image tokens per
image) with its offline processor (character tokenizer, Gemma 3 image processor, a chat template
rendering image parts), and ``--samples`` chat rows: one PNG each (a coloured shape on a
background, 40-90 pixels a side, resized to 56 by the processor) and a question, answered with a
caption of 20-200 characters. Both trainers read the same files.

Same training. fp32 on CPU, same global batch (8), micro-batch (4, so 2 accumulation steps),
steps, AdamW (lr 1e-4, no weight decay), cosine schedule without warmup, clipping at 1.0, seed 42,
vision tower frozen and projector and language model trained (ours: the default
``model.freeze_vision=true``; TRL: ``requires_grad_(False)`` on ``model.model.vision_tower``). LoRA
runs: rank 8 / alpha 16 on every linear layer of the language model (ours: the default target of a
VLM; TRL: the same modules by a regular expression). Loss on the answer only: ours trains the
assistant turn of the chat rows; TRL gets the same rows as prompt/completion conversations with
``completion_only_loss=True`` (its vision collator then masks the prompt, image tokens included).
TRL runs without gradient checkpointing, bf16, evaluation or saving.

What differs by design: ours encodes every sample (image decoding, processor, masking) once
before training, outside the timed window; TRL's vision collator decodes the images and runs the
processor on every micro-batch, inside the window (TRL does not pre-process vision datasets).
The "collate" line of the report shows how much of TRL's step time that is.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from finetune_vs_trl import (  # noqa: E402
    CHILD_ENV,
    _median,
    _report,
    _RssWatch,
    _set_threads,
    _windowed,
    announce,
    install_step_probes,
    selected_runs,
    spawn_child,
    trl_step_timer,
    wait_for_quiet,
)

RUNS = {"ours-full": ("ours", "none"), "trl-full": ("trl", "none"),
        "ours-lora": ("ours", "lora"), "trl-lora": ("trl", "lora")}
LORA = {"rank": 8, "alpha": 16}
#: The language model's linear layers of Gemma 3 (what our VLM LoRA default targets).
TRL_LORA_TARGETS = r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
MODEL = {"hidden_size": 256, "num_layers": 4, "image_size": 56, "tokens_per_image": 16}
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40),
           "purple": (140, 50, 170), "orange": (240, 140, 20)}
WORDS = ("a small shape sits near the middle of a plain background with soft edges and nothing else "
         "in view the colour is bright and even across the whole figure").split()


# ------------------------------------------------------------------------------ fixture
def build_fixture(root: Path, seed: int, samples: int) -> dict:
    """The model directory (weights + processor) and ``train.jsonl`` with its images."""
    from PIL import Image, ImageDraw

    from automodel_cli.components.models.tiny_vlm import build_gemma3_vlm

    model_dir = build_gemma3_vlm(root / "model", seed=seed, **MODEL)
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for index in range(samples):
        colour = rng.choice(list(COLOURS))
        size = rng.randint(40, 90)
        image = Image.new("RGB", (size, size), (245, 245, 245))
        box = [rng.randint(2, size // 3), rng.randint(2, size // 3), rng.randint(2 * size // 3, size - 2),
               rng.randint(2 * size // 3, size - 2)]
        (ImageDraw.Draw(image).ellipse if index % 2 else ImageDraw.Draw(image).rectangle)(box, fill=COLOURS[colour])
        image.save(data_dir / f"image{index}.png")
        caption = f"{colour} {'circle' if index % 2 else 'square'}:"
        while len(caption) < rng.randint(20, 200):
            caption += " " + rng.choice(WORDS)
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "path": f"image{index}.png"},
                                         {"type": "text", "text": "Describe the image."}]},
            {"role": "assistant", "content": [{"type": "text", "text": caption}]}]})
    data_path = data_dir / "train.jsonl"
    data_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"model_dir": str(model_dir), "data_path": str(data_path)}


# ------------------------------------------------------------------------------ children
def ours_result(out: Path, probe: dict, watch: _RssWatch, warmup: int) -> tuple[list[dict], dict, float]:
    """Our run's metrics.jsonl rows, the result fields every benchmark reports (throughput over
    the steps after ``warmup`` from the step-end probes, RSS, mean loss) and the window's seconds."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    cumulative = [0]
    for row in rows:
        cumulative.append(cumulative[-1] + row["tokens"])
    tokens, seconds = _windowed(cumulative, probe["step_ends"], warmup)
    _, cpu_seconds = _windowed(cumulative, probe["cpu_ends"], warmup)
    return rows, {"steps": len(rows), "tokens_per_s": tokens / seconds, "tokens_per_cpu_s": tokens / cpu_seconds,
                  "window_tokens": tokens, "threads_start": probe.get("threads_start"),
                  "rss_train_start_mb": watch.at_start / 2**20, "rss_train_peak_mb": watch.peak / 2**20,
                  "mean_loss": sum(r["loss"] for r in rows) / len(rows)}, seconds


def trl_result(timer: Any, watch: _RssWatch, warmup: int, mean_loss: float) -> tuple[dict, float]:
    """``ours_result``'s fields for a TRL run timed by ``trl_step_timer``, and the window's seconds."""
    tokens, seconds = _windowed(timer.tokens, timer.times, warmup)
    _, cpu_seconds = _windowed(timer.tokens, timer.cpu, warmup)
    return {"steps": len(timer.times) - 1, "tokens_per_s": tokens / seconds, "tokens_per_cpu_s": tokens / cpu_seconds,
            "window_tokens": tokens, "threads_start": timer.threads_start,
            "rss_train_start_mb": watch.at_start / 2**20, "rss_train_peak_mb": watch.peak / 2**20,
            "mean_loss": mean_loss}, seconds


def child_ours(spec: dict) -> None:
    """``automodel finetune`` in this process, with the step-end probes of finetune_vs_trl."""
    from automodel_cli.cli import main

    _set_threads(spec)
    watch, probe = install_step_probes()
    out = Path(spec["out"])
    code = main([
        "finetune", f"model.path={spec['model_dir']}", "model.dtype=float32", f"data.path={spec['data_path']}",
        "data.eval_split=null", "data.eval_size=0", "--peft", spec["peft"], f"peft.rank={LORA['rank']}",
        f"peft.alpha={LORA['alpha']}", "peft.dropout=0.0", f"train.max_steps={spec['steps']}",
        f"train.global_batch_size={spec['global_batch']}", f"train.micro_batch_size={spec['micro_batch']}",
        "train.seed=42", "train.max_grad_norm=1.0", "train.eval_every_steps=null", f"optim.lr={spec['lr']}",
        "optim.weight_decay=0.0", "optim.scheduler=cosine", "optim.warmup_steps=0", "checkpoint.every_steps=null",
        "logging.progress=false", "-o", str(out)])
    watch.stop()
    if code:
        raise SystemExit(f"automodel finetune exited with {code}")
    rows, fields, seconds = ours_result(out, probe, watch, spec["warmup"])
    _report({**fields, "images_per_s": spec["global_batch"] * (len(rows) - spec["warmup"]) / seconds})


def trl_dataset(data_path: str):
    """Our chat rows as TRL's conversational prompt/completion vision rows (images decoded by
    ``datasets``' Image feature, as TRL's documentation loads them)."""
    from datasets import Dataset, Image, Sequence

    base = Path(data_path).parent
    rows = []
    for line in Path(data_path).read_text().splitlines():
        user, assistant = json.loads(line)["messages"]
        image = next(part["path"] for part in user["content"] if part["type"] == "image")
        prompt = [{"role": "user", "content": [{"type": "image"} if p["type"] == "image" else p
                                               for p in user["content"]]}]
        rows.append({"prompt": prompt, "completion": [assistant], "images": [str(base / image)]})
    return Dataset.from_list(rows).cast_column("images", Sequence(Image()))


def child_trl(spec: dict) -> None:
    """TRL's SFTTrainer with its vision-language collator, timed by a callback."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    _set_threads(spec)
    watch = _RssWatch()

    processor = AutoProcessor.from_pretrained(spec["model_dir"])
    model = AutoModelForImageTextToText.from_pretrained(spec["model_dir"], dtype=torch.float32)
    model.model.vision_tower.requires_grad_(False)  # as ours: model.freeze_vision=true
    config = SFTConfig(
        output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["global_batch"] // spec["micro_batch"], learning_rate=spec["lr"],
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=42,
        max_length=None, completion_only_loss=True, gradient_checkpointing=False, bf16=False, fp16=False,
        use_cpu=True, eval_strategy="no", save_strategy="no", report_to="none", logging_steps=spec["steps"],
        dataloader_num_workers=0, disable_tqdm=True)
    peft_config = None
    if spec["peft"] == "lora":
        peft_config = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                 target_modules=TRL_LORA_TARGETS)
    timer = trl_step_timer(watch)
    trainer = SFTTrainer(model=model, args=config, train_dataset=trl_dataset(spec["data_path"]),
                         processing_class=processor, peft_config=peft_config, callbacks=[timer])
    timer.trainer = trainer
    collate_seconds = _time_collator(trainer, spec["micro_batch"])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    output = trainer.train()
    watch.stop()
    fields, seconds = trl_result(timer, watch, spec["warmup"], output.training_loss)
    _report({**fields, "trainable": trainable,
             "images_per_s": spec["global_batch"] * (len(timer.times) - 1 - spec["warmup"]) / seconds,
             "collate_s_per_micro_batch": collate_seconds,
             "checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False))})


def _time_collator(trainer, micro_batch: int) -> float:
    """Seconds TRL's collator takes for one micro-batch (image decoding and the processor)."""
    rows = [trainer.train_dataset[i] for i in range(micro_batch)]
    started = time.perf_counter()
    for _ in range(5):
        trainer.data_collator([dict(row) for row in rows])
    return (time.perf_counter() - started) / 5


# ------------------------------------------------------------------------------ parent
def run_child(name: str, spec: dict, log_dir: Path) -> dict:
    kind, peft = RUNS[name]
    result, stdout = spawn_child(Path(__file__), name, {**spec, "kind": kind, "peft": peft}, log_dir)
    for line in stdout.splitlines():
        if line.startswith("model:") and "trainable" in line:  # "model: DIR (X parameters, Y trainable, ..."
            result["trainable_text"] = line.split("(", 1)[1].split(",")[1].strip()
    return result


def print_report(results: dict[str, list[dict]], repeats: int) -> None:
    results = {name: rows for name, rows in results.items() if rows}
    print()
    print(f"{'run':10s} {'tokens/s':>9s} {'tok/CPU-s':>10s} {'images/s':>9s} {'peak RSS MB':>12s} "
          f"{'train peak':>11s} {'mean loss':>10s} {'other load':>11s}")
    med = {}
    for name, rows in results.items():
        med[name] = {key: _median([r[key] for r in rows]) for key in
                     ("tokens_per_s", "tokens_per_cpu_s", "images_per_s", "peak_rss_mb", "rss_train_peak_mb",
                      "mean_loss")}
        m = med[name]
        print(f"{name:10s} {m['tokens_per_s']:9.0f} {m['tokens_per_cpu_s']:10.0f} {m['images_per_s']:9.1f} "
              f"{m['peak_rss_mb']:12.0f} {m['rss_train_peak_mb']:11.0f} {m['mean_loss']:10.3f} "
              f"{max(r['external_load'] for r in rows):10.0%}")
    print(f"(medians of {repeats}; tokens: non-padding input tokens, image tokens included; MB = 2^20 bytes)")
    print()
    for method in ("full", "lora"):
        ours, trl = f"ours-{method}", f"trl-{method}"
        if ours in med and trl in med:
            print(f"{method:5s} ours / TRL: tokens/s {med[ours]['tokens_per_s'] / med[trl]['tokens_per_s']:5.2f}x   "
                  f"tok/CPU-s {med[ours]['tokens_per_cpu_s'] / med[trl]['tokens_per_cpu_s']:5.2f}x   "
                  f"peak RSS {med[ours]['peak_rss_mb'] / med[trl]['peak_rss_mb']:5.2f}x")
    print()
    for name, rows in results.items():
        first = rows[0]
        extra = (f"{first['trainable'] / 1e6:.3f}M trainable, collator {first['collate_s_per_micro_batch'] * 1e3:.0f} ms"
                 f" per micro-batch, activation checkpointing {first['checkpointing']}"
                 if "trainable" in first else f"{first.get('trainable_text', '?')}")
        print(f"{name}: timed window {first['window_tokens']} tokens; {extra}")


def benchmark_arguments(description: str, runs: dict, *, samples: int, samples_help: str, lr: float,
                        global_batch: int = 8, micro_batch: int = 4) -> argparse.ArgumentParser:
    """The options of a ``*_vs_trl`` benchmark that runs ``runs`` interleaved (also benchmarks/dpo.py)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 30; quick 12)")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each configuration (default 3; quick 1)")
    parser.add_argument("--warmup", type=int, default=3, help="leading steps excluded from throughput")
    parser.add_argument("--samples", type=int, default=samples, help=samples_help)
    parser.add_argument("--global-batch", type=int, default=global_batch)
    parser.add_argument("--micro-batch", type=int, default=micro_batch)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every run")
    parser.add_argument("--runs", default=",".join(runs), help=f"comma-separated subset of {', '.join(runs)}")
    parser.add_argument("--quick", action="store_true", help="smoke run: 12 steps, 1 repeat")
    parser.add_argument("--workdir", default=None, help="keep fixtures and logs here instead of a temp dir")
    parser.add_argument("--json", default=None, help="also write all raw results to this file")
    parser.add_argument("--max-external-load", type=float, default=0.10,
                        help="re-run a run when other processes used more than this fraction of the CPUs")
    parser.add_argument("--retries", type=int, default=2, help="re-runs allowed per run when the machine is busy")
    parser.add_argument("--quiet-wait", type=float, default=120,
                        help="before each run, wait up to this many seconds for the machine to be quiet")
    return parser


def measure(args: argparse.Namespace, names: list[str], repeats: int, base: dict, root: Path,
            run_one: Callable[[str, dict, Path], dict]) -> dict[str, list[dict]]:
    """Every run of ``names``, interleaved, ``repeats`` times: ``run_one(name, spec, log_dir)`` in
    a fresh interpreter, re-run (up to ``--retries``) when other processes loaded the machine;
    keeps each repeat's quietest attempt."""
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names:
            attempts = []
            for attempt in range(args.retries + 1):
                wait_for_quiet(args.max_external_load, args.quiet_wait)
                result = run_one(name, {**base, "out": str(root / "runs" / f"{name}-{repeat}-{attempt}")}, logs)
                attempts.append(result)
                print(f"  [{repeat + 1}/{repeats}] {name:10s} {result['tokens_per_s']:8.0f} tok/s  "
                      f"peak RSS {result['peak_rss_mb']:6.0f} MB  mean loss {result['mean_loss']:.4f}  "
                      f"other load {result['external_load']:4.0%}  ({result['run_seconds']:.0f}s)", flush=True)
                if result["external_load"] <= args.max_external_load:
                    break
            results[name].append(min(attempts, key=lambda r: r["external_load"]))
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def main() -> None:
    parser = benchmark_arguments(__doc__.split("\n\n")[0], RUNS, samples=240, samples_help="image-text rows",
                                 lr=1e-4)
    args = parser.parse_args()
    if args._child:  # one run, in the fresh interpreter spawn_child started
        spec = json.loads(args._child)
        return (child_ours if spec["kind"] == "ours" else child_trl)(spec)

    os.environ.update(CHILD_ENV)
    default_steps, default_repeats = (12, 1) if args.quick else (30, 3)
    steps, repeats = args.steps or default_steps, args.repeats or default_repeats
    warmup = min(args.warmup, steps - 1)
    names = selected_runs(parser, args.runs, RUNS)
    announce(f"settings: {steps} steps (first {warmup} excluded), {repeats} repeat(s), {args.samples} samples, "
             f"global batch {args.global_batch}, micro-batch {args.micro_batch}, lr {args.lr}, fp32, "
             f"model {MODEL}, LoRA r={LORA['rank']} alpha={LORA['alpha']}, "
             f"torch threads {args.threads or 'default'}")
    with tempfile.TemporaryDirectory(prefix="vlm_vs_trl_") as tmp:
        root = Path(args.workdir) if args.workdir else Path(tmp)
        fixture = build_fixture(root / "fixture", seed=1234, samples=args.samples)
        base = {**fixture, "steps": steps, "warmup": warmup, "global_batch": args.global_batch,
                "micro_batch": args.micro_batch, "lr": args.lr, "threads": args.threads}
        results = measure(args, names, repeats, base, root, run_child)
    print_report(results, repeats)


if __name__ == "__main__":
    main()
