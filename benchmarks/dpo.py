"""Preference-training throughput and peak memory: ``automodel dpo`` against TRL's ``DPOTrainer``.

Usage::

    python benchmarks/dpo.py                  # 30 steps, 3 repeats, full and LoRA
    python benchmarks/dpo.py --quick          # smoke run: 12 steps, 1 repeat
    python benchmarks/dpo.py --runs ours-lora,trl-lora --threads 1
    python benchmarks/dpo.py --runs ours-full-packed,trl-full    # ours with data.packing=true

Same inputs: the tiny Llama and BPE tokenizer of ``_bench_common`` (random init, 8k vocab,
saved with ``save_pretrained``) and preference rows of pseudo-text (prompt of 4-100 words, two
responses of 4-120 words each, log-uniform), seeded, so both trainers see the same bytes. Both
tokenise a pair to ``<s> prompt`` + ``response </s>`` and score the response tokens only.

Same training: sigmoid DPO, beta 0.1, fp32 on CPU, no autocast; same global batch (8 pairs),
micro-batch (4 pairs, so 2 accumulation steps), max_length 512, steps, AdamW (lr 1e-5, no weight
decay), cosine schedule without warmup, clipping at 1.0, seed 42; LoRA rank 8 / alpha 16 / no
dropout on every linear layer of the decoder. Full fine-tuning: both keep a frozen reference
copy (TRL loads a second copy of the model; ours ``FrozenTeacher``); LoRA: both use the base with
the adapter disabled. TRL runs without gradient checkpointing, no eval, no saving. ``ours-*-packed``
runs set ``data.packing=true`` (each micro-batch's sequences packed into rows of 512 tokens; TRL's
DPOTrainer is run unpacked, its default).

Same metric (``finetune_vs_trl.py`` explains the probes, reused here): throughput = non-padding
input tokens (chosen + rejected, prompt included) per second of training loop after the first
``--warmup`` steps; ``tok/CPU-s`` the same per CPU-second of the trainer process (the figure to
trust on a shared machine); ``peak RSS`` the child's maximum RSS (whole process) and ``train
peak`` the highest RSS sampled during training.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _bench_common import TextSampler, _log_uniform, build_model, build_tokenizer  # noqa: E402
from finetune_vs_trl import CHILD_ENV, _median, _report, _RssWatch, _set_threads  # noqa: E402
from finetune_vs_trl import announce, install_step_probes, selected_runs, spawn_child, trl_step_timer  # noqa: E402
from vlm_vs_trl import benchmark_arguments, measure, ours_result, trl_result  # noqa: E402

#: Run name -> (trainer, peft method, packing).
RUNS = {"ours-full": ("ours", "none", False), "trl-full": ("trl", "none", False),
        "ours-lora": ("ours", "lora", False), "trl-lora": ("trl", "lora", False),
        "ours-full-packed": ("ours", "none", True), "ours-lora-packed": ("ours", "lora", True)}
LORA = {"rank": 8, "alpha": 16}
MAX_LENGTH = 512


# ------------------------------------------------------------------------------ fixture
def build_fixture(root: Path, seed: int, samples: int) -> dict:
    """The model directory (weights + tokenizer) and ``train.jsonl`` of preference rows."""
    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / "model"
    sampler = TextSampler(seed)
    build_tokenizer(model_dir, sampler, seed)
    build_model(model_dir, seed)
    rng = random.Random(seed + 1)
    rows = []
    for _ in range(samples):
        prompt = f"### Instruction:\n{sampler.sentence_text(rng, _log_uniform(rng, 4, 100))}\n### Response:\n"
        chosen, rejected = (sampler.sentence_text(rng, _log_uniform(rng, 4, 120)) for _ in range(2))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    data_path = root / "train.jsonl"
    data_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"model_dir": str(model_dir), "data_path": str(data_path)}


# ------------------------------------------------------------------------------ children
def child_ours(spec: dict) -> None:
    """``automodel dpo`` in this process, with the step-end probes of finetune_vs_trl."""
    from automodel_cli.cli import main

    _set_threads(spec)
    watch, probe = install_step_probes()
    out = Path(spec["out"])
    code = main([
        "dpo", f"model.path={spec['model_dir']}", "model.dtype=float32", f"data.path={spec['data_path']}",
        f"data.max_length={MAX_LENGTH}", f"data.packing={'true' if spec['packing'] else 'false'}", "data.eval_split=null", "data.eval_size=0", "--peft", spec["peft"],
        f"peft.rank={LORA['rank']}", f"peft.alpha={LORA['alpha']}", "peft.dropout=0.0", "peft.target_modules=all-linear",
        f"train.max_steps={spec['steps']}", f"train.global_batch_size={spec['global_batch']}",
        f"train.micro_batch_size={spec['micro_batch']}", "train.seed=42", "train.max_grad_norm=1.0",
        "train.eval_every_steps=null", f"optim.lr={spec['lr']}", "optim.weight_decay=0.0", "optim.scheduler=cosine",
        "optim.warmup_steps=0", "checkpoint.every_steps=null", "logging.progress=false", "dpo.beta=0.1",
        "-o", str(out)])
    watch.stop()
    if code:
        raise SystemExit(f"automodel dpo exited with {code}")
    rows, fields, _ = ours_result(out, probe, watch, spec["warmup"])
    _report({**fields, "first_loss": rows[0]["loss"]})


def child_trl(spec: dict) -> None:
    """TRL's DPOTrainer on the same model and data, timed by a callback."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    _set_threads(spec)
    watch = _RssWatch()
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    config = DPOConfig(
        output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["global_batch"] // spec["micro_batch"], learning_rate=spec["lr"],
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=42,
        max_length=MAX_LENGTH, beta=0.1, loss_type=["sigmoid"], gradient_checkpointing=False, bf16=False,
        fp16=False, use_cpu=True, eval_strategy="no", save_strategy="no", report_to="none",
        logging_steps=spec["steps"], dataloader_num_workers=0, disable_tqdm=True)
    peft_config = None
    if spec["peft"] == "lora":
        peft_config = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                 target_modules="all-linear")
    timer = trl_step_timer(watch)
    trainer = DPOTrainer(model=model, args=config, train_dataset=load_dataset("json", data_files=spec["data_path"],
                                                                              split="train"),
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[timer])
    timer.trainer = trainer
    output = trainer.train()
    watch.stop()
    _report(trl_result(timer, watch, spec["warmup"], output.training_loss)[0])


# ------------------------------------------------------------------------------ parent
def run_child(name: str, spec: dict, log_dir: Path) -> dict:
    kind, peft, packing = RUNS[name]
    return spawn_child(Path(__file__), name, {**spec, "kind": kind, "peft": peft, "packing": packing}, log_dir)[0]


def print_report(results: dict[str, list[dict]], repeats: int) -> None:
    results = {name: rows for name, rows in results.items() if rows}
    print()
    print(f"{'run':17s} {'tokens/s':>9s} {'tok/CPU-s':>10s} {'peak RSS MB':>12s} {'train peak':>11s} "
          f"{'mean loss':>10s} {'other load':>11s}")
    med = {}
    for name, rows in results.items():
        med[name] = {key: _median([r[key] for r in rows]) for key in
                     ("tokens_per_s", "tokens_per_cpu_s", "peak_rss_mb", "rss_train_peak_mb", "mean_loss")}
        m = med[name]
        print(f"{name:17s} {m['tokens_per_s']:9.0f} {m['tokens_per_cpu_s']:10.0f} {m['peak_rss_mb']:12.0f} "
              f"{m['rss_train_peak_mb']:11.0f} {m['mean_loss']:10.4f} {max(r['external_load'] for r in rows):10.0%}")
    print(f"(medians of {repeats}; tokens: non-padding input tokens of chosen and rejected; MB = 2^20 bytes)")
    print()
    for method, ours, trl in (("full", "ours-full", "trl-full"), ("lora", "ours-lora", "trl-lora"),
                              ("full, ours packed", "ours-full-packed", "trl-full"),
                              ("lora, ours packed", "ours-lora-packed", "trl-lora")):
        if ours in med and trl in med:
            print(f"{method:5s} ours / TRL: tokens/s {med[ours]['tokens_per_s'] / med[trl]['tokens_per_s']:5.2f}x   "
                  f"tok/CPU-s {med[ours]['tokens_per_cpu_s'] / med[trl]['tokens_per_cpu_s']:5.2f}x   "
                  f"peak RSS {med[ours]['peak_rss_mb'] / med[trl]['peak_rss_mb']:5.2f}x   "
                  f"train peak {med[ours]['rss_train_peak_mb'] / med[trl]['rss_train_peak_mb']:5.2f}x")
            same = results[ours][0]["window_tokens"] == results[trl][0]["window_tokens"]
            print(f"      timed window: {'the same' if same else 'a DIFFERENT'} number of tokens "
                  f"({results[ours][0]['window_tokens']} vs {results[trl][0]['window_tokens']})")


def main() -> None:
    parser = benchmark_arguments(__doc__.split("\n\n")[0], RUNS, samples=400, samples_help="preference rows",
                                 lr=1e-5)
    args = parser.parse_args()
    if args._child:  # one run, in the fresh interpreter spawn_child started
        spec = json.loads(args._child)
        return (child_ours if spec["kind"] == "ours" else child_trl)(spec)

    os.environ.update(CHILD_ENV)
    steps, repeats = args.steps or (12 if args.quick else 30), args.repeats or (1 if args.quick else 3)
    warmup = min(args.warmup, steps - 1)
    names = selected_runs(parser, args.runs, RUNS)
    announce(f"settings: {steps} steps (first {warmup} excluded), {repeats} repeat(s), {args.samples} pairs, "
             f"global batch {args.global_batch} pairs, micro-batch {args.micro_batch}, lr {args.lr}, fp32, "
             f"sigmoid DPO beta 0.1, LoRA r={LORA['rank']} alpha={LORA['alpha']}, "
             f"torch threads {args.threads or 'default'}")
    with tempfile.TemporaryDirectory(prefix="dpo_vs_trl_") as tmp:
        root = Path(args.workdir) if args.workdir else Path(tmp)
        base = {**build_fixture(root / "fixture", seed=1234, samples=args.samples), "steps": steps, "warmup": warmup,
                "global_batch": args.global_batch, "micro_batch": args.micro_batch, "lr": args.lr,
                "threads": args.threads}
        results = measure(args, names, repeats, base, root, run_child)
    print_report(results, repeats)


if __name__ == "__main__":
    main()
