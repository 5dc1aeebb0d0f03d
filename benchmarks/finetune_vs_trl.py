"""Fine-tuning throughput and peak memory: ``automodel finetune`` against TRL's ``SFTTrainer``.

Usage::

    python benchmarks/finetune_vs_trl.py                 # 40 steps, 3 repeats (full settings)
    python benchmarks/finetune_vs_trl.py --quick         # smoke run: 12 steps, 1 repeat, 400 samples
    python benchmarks/finetune_vs_trl.py --runs ours-lora,trl-lora --repeats 5
    python benchmarks/finetune_vs_trl.py --runs ours-full-packed,trl-full-packed,trl-full   # both packed

What is compared, and why the comparison is fair
------------------------------------------------
*Same inputs.* A temporary directory gets a random-init ~5M-parameter Llama (8k vocab, tied
embeddings) saved with ``save_pretrained``, a byte-level BPE tokenizer with an 8192-token vocab
trained with ``tokenizers`` (BOS added by its post-processor, dedicated pad token), and 2000
prompt/completion samples of 21-420 tokens (log-uniform lengths, so padding matters). Everything
is seeded, so every run of every trainer sees the same bytes. Both trainers tokenise a sample to
the same ids, ``<s> prompt completion </s>``, and train on the completion (and EOS) only; the
script checks that both report the same sample, token and trained-token counts ("data parity").

*Same training.* Same weights, fp32 on CPU, no autocast; same global batch (16), micro-batch (8,
so 2 accumulation steps), max_length (512, nothing truncated), steps, AdamW (lr 1e-4, betas
0.9/0.999, eps 1e-8, no weight decay), cosine schedule without warmup, gradient clipping at 1.0,
seed 42, LoRA rank 8 / alpha 16 / no dropout on all linear layers of the decoder. TRL runs
without gradient checkpointing (TRL turns it on by default; ours has it off), without bf16 (TRL's
default on CPU), no eval, no checkpoint saving, ``report_to="none"``, 0 dataloader workers.

*Packing.* ``trl-*`` runs do not pack (``packing=False``, its default padding collator);
``trl-*-packed`` runs use TRL's ``packing=True`` with its default strategy, best-fit decreasing
(``"bfd"``), which also turns on padding-free batches (a micro-batch of packs is flattened into
one row with position ids restarting per document). ``ours-*-packed`` runs use
``data.packing=true`` (best-fit decreasing packs of ``max_length`` tokens, collated as rows with
restarting position ids). Packed runs of both trainers count a step as 16 packs of up to 512
tokens (8 per micro-batch), and throughput counts only real (non-padding) tokens, so the
comparison stays per real token. ``--loss``, ``--ac`` and ``--compile`` set ``loss.name``,
``train.activation_checkpointing`` and ``train.compile`` of our runs (defaults: ``masked_ce``,
``none``, off: the defaults of ``automodel finetune``), to measure those trade-offs. Each trainer keeps its own data
order (both shuffle with seed 42) and its own optimiser implementation (TRL: transformers'
default ``adamw_torch_fused``; ours: ``torch.optim.AdamW(foreach=True)``).

*Same metric.* Throughput = non-padding input tokens processed in the training loop / wall time
of the training loop, over the steps after the first ``--warmup`` (5) steps. Model loading,
tokenisation and the first steps are excluded for both.

- ours: from ``metrics.jsonl``: ``sum(tokens) / sum(tokens / tokens_per_s)`` over the steps after
  warm-up. A step's time runs from picking its samples (collation included) to after the
  optimizer step. The harness also timestamps every step end (a wrapper around the JSONL
  logger's ``log``) and reports the end-to-end wall-clock figure as a cross-check.
- TRL: a ``TrainerCallback`` timestamps ``on_step_end`` and reads ``trainer._total_train_tokens``,
  which TRL's ``compute_loss`` increments by ``attention_mask.sum()`` of every micro-batch (with
  padding-free packing: the length of the flattened row, which holds no padding), i.e. exactly
  the non-padding tokens. Throughput = token delta / time between the end of the last warm-up
  step and the end of the last step. That window includes fetching and collating the batches
  (which ``Trainer`` does before ``on_step_begin``), like ours.
- Both also record the process's CPU time (``time.process_time()``) at the same points and report
  ``tok/CPU-s``: the window's tokens per CPU-second of the trainer process. With a single thread
  (``--threads 1``) on an idle machine it equals tokens/s; on a shared machine it is barely
  disturbed by other jobs (wall time is), so it is the figure to trust when the "other load"
  column is not ~0.

In practice both trainers even see the same samples in the same steps (both shuffle with
``torch.randperm`` seeded 42) and print the same mean training loss, which shows that they
compute the same thing; the script reports whether the timed windows hold the same tokens.

*Same machine state.* Every run is its own subprocess (fresh interpreter, so peak RSS is per run)
and the runs are interleaved (ours, TRL, ours, ... per repeat) so that background noise hits
both alike; the table shows medians over ``--repeats``. Each child reports
``torch.get_num_threads()`` at the start and end of training; the script warns if they differ.
On a shared machine, another job's CPU burst slows a run several-fold, so the parent measures
the CPU time other processes used during each run (``/proc/stat`` busy time minus the child's
own) and re-runs a run when that exceeds ``--max-external-load`` (10% of the machine), up
to ``--retries`` times, keeping the quietest attempt; runs that stayed noisy are flagged. Before
each run it also waits (up to ``--quiet-wait`` seconds) for the machine to be idle. ``--threads 1``
pins every run to one torch thread, so that a job on the other core slows it far less.

Memory: ``peak RSS`` is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the child at exit (the
whole process: imports, tokenisation, training). ``RSS@train`` is the RSS when training starts
and ``train peak`` the highest RSS sampled (every 20 ms) during training, which separates the
training loop's own footprint from the libraries each trainer imports.

Scope: the numbers are for CPU. TRL always routes the loss through its fused LM head, which on a
GPU runs a Triton kernel but on CPU falls back to torch ops (it recomputes the vocabulary
projection in backward and computes entropy and top-1 metrics over the whole vocabulary), so
do not read these ratios as GPU ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "BENCH_RESULT "

#: Run name -> (trainer, peft method, packing).
RUNS = {
    "ours-full": ("ours", "none", False),
    "trl-full": ("trl", "none", False),
    "ours-lora": ("ours", "lora", False),
    "trl-lora": ("trl", "lora", False),
    "ours-full-packed": ("ours", "none", True),
    "ours-lora-packed": ("ours", "lora", True),
    "trl-full-packed": ("trl", "none", True),
    "trl-lora-packed": ("trl", "lora", True),
}

#: Offline (nothing is fetched from the hub) and quiet (no progress bars in the logs).
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
             "TOKENIZERS_PARALLELISM": "false"}

LORA = {"rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}


# ------------------------------------------------------------------------------ child side


class _RssWatch:
    """RSS at the start of training and the highest RSS sampled while training runs."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self.at_start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _rss(self) -> int:
        return self._process.memory_info().rss

    def start(self) -> None:
        if self._thread is not None:
            return
        self.at_start = self.peak = self._rss()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._rss())

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.peak = max(self.peak, self._rss())


def _report(payload: dict) -> None:
    import resource

    import torch

    payload["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    payload["threads_end"] = torch.get_num_threads()
    payload["torch_version"] = torch.__version__
    print(RESULT_PREFIX + json.dumps(payload), flush=True)


def _windowed(values: list[float], times: list[float], warmup: int) -> tuple[float, float]:
    """(tokens, seconds) from cumulative-token and timestamp lists indexed by step (0 = start)."""
    return values[-1] - values[warmup], times[-1] - times[warmup]


def _set_threads(spec: dict) -> None:
    """``--threads N``: the same number of torch (intra-op) threads in every run."""
    if spec.get("threads"):
        import torch

        torch.set_num_threads(int(spec["threads"]))


def install_step_probes() -> tuple[_RssWatch, dict]:
    """Patch two read-only probes into ``automodel finetune`` run in this process: when training
    starts (torch threads, the RSS watch, a first timestamp) and after every optimizer step (the
    JSONL logger's ``log``): wall-clock and CPU timestamps in ``probe["step_ends"]`` and
    ``probe["cpu_ends"]``."""
    import torch

    from automodel_cli.components.logging import jsonl
    from automodel_cli.components.training import progress

    watch = _RssWatch()
    probe: dict = {"step_ends": [], "cpu_ends": []}

    enter = progress.TrainingProgress.__enter__

    def enter_and_mark(self):  # training starts: the loop is entered right after
        probe["threads_start"] = torch.get_num_threads()
        watch.start()
        probe["step_ends"].append(time.perf_counter())
        probe["cpu_ends"].append(time.process_time())
        return enter(self)

    log = jsonl.JsonlLogger.log

    def log_and_mark(self, metrics, step):  # called once per optimizer step, after the step
        probe["step_ends"].append(time.perf_counter())
        probe["cpu_ends"].append(time.process_time())
        return log(self, metrics, step)

    progress.TrainingProgress.__enter__ = enter_and_mark
    jsonl.JsonlLogger.log = log_and_mark
    return watch, probe


def trl_step_timer(watch: _RssWatch):
    """A ``TrainerCallback`` that timestamps each step end (wall clock and CPU) with TRL's running
    count of non-padding input tokens; set its ``trainer`` once the trainer is built."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.trainer = None
            self.times: list[float] = []
            self.cpu: list[float] = []
            self.tokens: list[int] = []
            self.threads_start = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.threads_start = torch.get_num_threads()
            watch.start()
            self.on_step_end(args, state, control)

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())
            self.cpu.append(time.process_time())
            self.tokens.append(self.trainer._total_train_tokens)

    return StepTimer()


def child_ours(spec: dict) -> None:
    """Run ``automodel finetune`` in this process, with two read-only probes patched in."""
    from automodel_cli.cli import main

    _set_threads(spec)
    watch, probe = install_step_probes()

    out = Path(spec["out"])
    argv = [
        "finetune",
        f"model.path={spec['model_dir']}", "model.dtype=float32",
        f"data.path={spec['data_path']}", f"data.max_length={spec['max_length']}",
        f"data.packing={'true' if spec['packing'] else 'false'}", "data.eval_split=null", "data.eval_size=0",
        "--peft", spec["peft"],
        f"peft.rank={LORA['rank']}", f"peft.alpha={LORA['alpha']}", f"peft.dropout={LORA['dropout']}",
        f"peft.target_modules={LORA['target_modules']}",
        f"train.max_steps={spec['steps']}", f"train.global_batch_size={spec['global_batch']}",
        f"train.micro_batch_size={spec['micro_batch']}", "train.seed=42", "train.max_grad_norm=1.0",
        "train.eval_every_steps=null", f"train.activation_checkpointing={spec.get('ac', 'none')}",
        f"train.compile={'true' if spec.get('compile') else 'false'}",
        f"optim.lr={spec['lr']}", "optim.weight_decay=0.0", "optim.scheduler=cosine", "optim.warmup_steps=0",
        "checkpoint.every_steps=null", "logging.progress=false", f"loss.name={spec.get('loss', 'masked_ce')}",
        "-o", str(out),
    ]
    code = main(argv)
    watch.stop()
    if code:
        raise SystemExit(f"automodel finetune exited with {code}")

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    after = rows[spec["warmup"]:]
    tokens = sum(r["tokens"] for r in after)
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in after)
    ends = probe["step_ends"]
    cumulative = [0]
    for r in rows:
        cumulative.append(cumulative[-1] + r["tokens"])
    wall_tokens, wall_seconds = _windowed(cumulative, ends, spec["warmup"])
    _, cpu_seconds = _windowed(cumulative, probe["cpu_ends"], spec["warmup"])
    _report({
        "steps": len(rows),
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_wall": wall_tokens / wall_seconds,
        "tokens_per_cpu_s": wall_tokens / cpu_seconds,
        "window_tokens": tokens,
        "window_seconds": seconds,
        "threads_start": probe.get("threads_start"),
        "rss_train_start_mb": watch.at_start / 2**20,
        "rss_train_peak_mb": watch.peak / 2**20,
        "mean_loss": sum(r["loss"] for r in rows) / len(rows),
    })


def child_trl(spec: dict) -> None:
    """Run TRL's SFTTrainer on the same model and data, timed by a callback."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    _set_threads(spec)
    watch = _RssWatch()
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    dataset = load_dataset("json", data_files=spec["data_path"], split="train")
    accumulation = spec["global_batch"] // spec["micro_batch"]
    config = SFTConfig(
        output_dir=spec["out"],
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=accumulation,
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        seed=42,
        max_length=spec["max_length"],
        packing=spec["packing"],  # True: TRL's default "bfd" strategy, which implies padding_free
        completion_only_loss=True,
        activation_checkpointing=False,  # TRL's default is on (SFTConfig.gradient_checkpointing=True)
        bf16=False,
        fp16=False,
        use_cpu=True,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_strategy="steps",
        logging_steps=spec["steps"],  # log once, at the end (ours writes a JSONL line per step)
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    peft_config = None
    if spec["peft"] == "lora":
        peft_config = LoraConfig(
            r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
            target_modules=LORA["target_modules"], task_type="CAUSAL_LM",
        )
    timer = trl_step_timer(watch)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[timer])
    timer.trainer = trainer

    train = trainer.train_dataset
    if spec["packing"]:  # rows are packs; compare pack counts and tokens with ours
        parity = {"packs": len(train), "tokens": sum(len(ids) for ids in train["input_ids"])}
    else:
        parity = {
            "samples": len(train),
            "tokens": sum(len(ids) for ids in train["input_ids"]),
            # ours counts labels after the causal shift; labels[0] (BOS) is masked in both anyway
            "trained_tokens": sum(sum(1 for t in labels[1:] if t != -100) for labels in train["labels"]),
        }
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    output = trainer.train()
    watch.stop()
    tokens, seconds = _windowed(timer.tokens, timer.times, spec["warmup"])
    _, cpu_seconds = _windowed(timer.tokens, timer.cpu, spec["warmup"])
    _report({
        "steps": len(timer.times) - 1,
        "tokens_per_s": tokens / seconds,
        "tokens_per_cpu_s": tokens / cpu_seconds,
        "window_tokens": tokens,
        "window_seconds": seconds,
        "threads_start": timer.threads_start,
        "rss_train_start_mb": watch.at_start / 2**20,
        "rss_train_peak_mb": watch.peak / 2**20,
        "mean_loss": output.training_loss,  # mean of the per-step losses
        "parity": parity,
        "checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
        "bf16": bool(config.bf16),
        "trainable": trainable,
        "optim": str(config.optim),
        "attn": model.config._attn_implementation,
    })


# ----------------------------------------------------------------------------- parent side


def _busy_cpu_seconds() -> float:
    """CPU time the whole machine spent busy (all processes, all cores), steal included."""
    import psutil

    t = psutil.cpu_times()
    return sum(getattr(t, field, 0.0) for field in ("user", "nice", "system", "irq", "softirq", "steal"))


def _children_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_quiet(threshold: float, max_wait: float, probe: float = 2.0) -> float:
    """Block until other processes use less than ``threshold`` of the CPUs over a ``probe``-second
    window (this process is idle meanwhile), or ``max_wait`` seconds pass; returns the seconds
    waited."""
    import psutil

    started = time.perf_counter()
    announced = False
    while psutil.cpu_percent(interval=probe) / 100 > threshold:
        waited = time.perf_counter() - started
        if waited >= max_wait:
            break
        if not announced:
            print(f"  (machine busy: waiting up to {max_wait:.0f}s for other jobs to finish)", flush=True)
            announced = True
    return time.perf_counter() - started


def spawn_child(script: Path, name: str, spec: dict, log_dir: Path) -> tuple[dict, str]:
    """Run ``script --_child SPEC`` in a fresh interpreter; its parsed result and its standard
    output (the log goes to ``log_dir``).

    Also measures ``external_load``: CPU time used by *other* processes during the run, as a
    fraction of the machine's capacity (wall time x cores). On a shared machine another job's
    burst slows a CPU run several-fold (the OpenMP threads get oversubscribed), so the caller
    re-runs a run whose external load is too high.
    """
    command = [sys.executable, str(Path(script).resolve()), "--_child", json.dumps(spec)]
    env = {**os.environ, **CHILD_ENV}
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec["threads"])
    busy, own = _busy_cpu_seconds(), _children_cpu_seconds()
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    external = (_busy_cpu_seconds() - busy) - (_children_cpu_seconds() - own)
    log_path = log_dir / f"{Path(spec['out']).name}.log"
    log_path.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode or not lines:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); log: {log_path}\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["run_seconds"] = wall
    result["external_load"] = max(0.0, external / (wall * (os.cpu_count() or 1)))
    return result, proc.stdout


def run_child(name: str, spec: dict, log_dir: Path) -> dict:
    """One run in a fresh interpreter (``spawn_child``); returns its result (and parity info for ours)."""
    trainer, peft, packing = RUNS[name]
    result, stdout = spawn_child(Path(__file__), name, {**spec, "kind": trainer, "peft": peft, "packing": packing},
                                 log_dir)
    if trainer == "ours":  # "train data: N samples, T tokens, L trained tokens, K truncated"
        for line in stdout.splitlines():
            if line.startswith("train data:"):
                words = line.replace(",", "").split()
                result["parity"] = {"samples": int(words[2]), "tokens": int(words[4]),
                                    "trained_tokens": int(words[6])}
        for line in stdout.splitlines():
            if line.startswith("packing:"):  # "packing: N samples into M sequences of up to ..."
                words = line.split()
                result["parity"] = {"packs": int(words[4]), "tokens": result["parity"]["tokens"]}
            if line.startswith("padding:"):  # "padding: 1.2% of the ..."
                result["padding_fraction"] = float(line.split()[1].rstrip("%")) / 100
    return result


def machine_info() -> list[str]:
    import peft
    import torch
    import transformers
    import trl

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        f"machine: {cpu}; os.cpu_count()={os.cpu_count()}, usable cores={affinity}, "
        f"torch.get_num_threads()={torch.get_num_threads()}",
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}, peft {peft.__version__}",
    ]


def selected_runs(parser: argparse.ArgumentParser, runs: str, known: dict) -> list[str]:
    """The names of ``--runs`` (comma-separated), each one of ``known``."""
    names = [n.strip() for n in runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; choose from {list(known)}")
    return names


def announce(settings: str) -> None:
    """Print the command line, the machine and library versions, and the run settings."""
    print("$ " + shlex.join([Path(sys.executable).name, *sys.argv]))
    for line in machine_info():
        print(line)
    print(settings, flush=True)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 40; quick 12)")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each configuration (default 3; quick 1)")
    parser.add_argument("--warmup", type=int, default=5, help="leading steps excluded from throughput")
    parser.add_argument("--samples", type=int, default=None, help="training samples (default 2000; quick 400)")
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--loss", default="masked_ce", help="loss.name of our runs (default masked_ce)")
    parser.add_argument("--ac", default="none", choices=["none", "full", "selective"],
                        help="train.activation_checkpointing of our runs (default none)")
    parser.add_argument("--compile", action="store_true", help="train.compile=true for our runs")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in every run (default: torch's default, one per core). On a "
                             "shared machine, 1 keeps a run on one core, so another job on the other "
                             "cores disturbs it far less")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer steps, samples and repeats")
    parser.add_argument("--workdir", default=None, help="keep fixtures and logs here instead of a temp dir")
    parser.add_argument("--json", default=None, help="also write all raw results to this file")
    parser.add_argument("--report", default=None, metavar="JSON",
                        help="print the report of a results file written by --json, without running")
    parser.add_argument("--max-external-load", type=float, default=0.10,
                        help="re-run a run when other processes used more than this fraction of the CPUs "
                             "during it (default 0.10)")
    parser.add_argument("--retries", type=int, default=3, help="re-runs allowed per run when the machine is busy")
    parser.add_argument("--quiet-wait", type=float, default=600,
                        help="before each run, wait up to this many seconds for the machine to be quiet")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._child:
        spec = json.loads(args._child)
        (child_ours if spec["kind"] == "ours" else child_trl)(spec)
        return

    os.environ.update(CHILD_ENV)
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        print_report(saved, max(len(rows) for rows in saved.values()))
        return
    steps = args.steps or (12 if args.quick else 40)
    repeats = args.repeats or (1 if args.quick else 3)
    samples = args.samples or (400 if args.quick else 2000)
    warmup = min(args.warmup, steps - 1)
    names = selected_runs(parser, args.runs, RUNS)
    announce(f"settings: {steps} steps (first {warmup} excluded), {repeats} repeat(s), {samples} samples, "
             f"global batch {args.global_batch}, micro-batch {args.micro_batch}, max_length {args.max_length}, "
             f"lr {args.lr}, fp32, LoRA r={LORA['rank']} alpha={LORA['alpha']} {LORA['target_modules']}, "
             f"ours: loss.name={args.loss}, activation checkpointing {args.ac}, compile {args.compile}; "
             f"torch threads {args.threads or 'default'}")

    with tempfile.TemporaryDirectory(prefix="finetune_vs_trl_") as tmp:
        root = Path(args.workdir) if args.workdir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        sys.path.insert(0, str(HERE))
        from _bench_common import build_fixture

        started = time.perf_counter()
        fixture = build_fixture(root / "fixture", seed=1234, n_samples=samples)
        print(f"fixture: Llama with {fixture['n_params'] / 1e6:.2f}M parameters, 8192-token BPE tokenizer, "
              f"{samples} prompt/completion samples ({time.perf_counter() - started:.0f}s to build)", flush=True)
        logs = root / "logs"
        logs.mkdir(exist_ok=True)

        base = {"model_dir": fixture["model_dir"], "data_path": fixture["data_path"], "steps": steps,
                "warmup": warmup, "global_batch": args.global_batch, "micro_batch": args.micro_batch,
                "max_length": args.max_length, "lr": args.lr, "loss": args.loss, "ac": args.ac,
                "compile": args.compile, "threads": args.threads}
        results: dict[str, list[dict]] = {name: [] for name in names}
        for repeat in range(repeats):
            for name in names:
                attempts = []
                for attempt in range(args.retries + 1):
                    spec = {**base, "out": str(root / "runs" / f"{name}-{repeat}-{attempt}")}
                    wait_for_quiet(args.max_external_load, args.quiet_wait)
                    result = run_child(name, spec, logs)
                    attempts.append(result)
                    busy = result["external_load"] > args.max_external_load
                    print(f"  [{repeat + 1}/{repeats}] {name:17s} {result['tokens_per_s']:8.0f} tok/s  "
                          f"peak RSS {result['peak_rss_mb']:6.0f} MB  threads {result['threads_start']}/"
                          f"{result['threads_end']}  mean loss {result['mean_loss']:.3f}  "
                          f"other load {result['external_load']:4.0%}  ({result['run_seconds']:.0f}s)"
                          + ("  busy machine: re-running" if busy and attempt < args.retries else ""),
                          flush=True)
                    if not busy:
                        break
                best = min(attempts, key=lambda r: r["external_load"])
                best["noisy"] = best["external_load"] > args.max_external_load
                results[name].append(best)
                if args.json:  # after every run, so an interrupted benchmark keeps what it measured
                    Path(args.json).write_text(json.dumps(results, indent=2))

    print_report(results, repeats)


def print_report(results: dict[str, list[dict]], repeats: int) -> None:
    results = {name: rows for name, rows in results.items() if rows}
    print()
    print(f"{'run':17s} {'tokens/s':>9s} {'min-max':>13s} {'tok/CPU-s':>10s} {'peak RSS MB':>12s} "
          f"{'RSS@train':>10s} {'train peak':>11s} {'threads':>8s} {'other load':>11s}")
    summary, per_cpu = {}, {}
    for name, rows in results.items():
        tps = [r["tokens_per_s"] for r in rows]
        summary[name] = _median(tps)
        cpu = [r["tokens_per_cpu_s"] for r in rows if "tokens_per_cpu_s" in r]
        per_cpu[name] = _median(cpu) if cpu else float("nan")
        threads = "/".join(sorted({str(r["threads_start"]) for r in rows} | {str(r["threads_end"]) for r in rows}))
        load = max(r.get("external_load", 0.0) for r in rows)
        print(f"{name:17s} {_median(tps):9.0f} {min(tps):6.0f}-{max(tps):<6.0f} {per_cpu[name]:10.0f} "
              f"{_median([r['peak_rss_mb'] for r in rows]):12.0f} "
              f"{_median([r['rss_train_start_mb'] for r in rows]):10.0f} "
              f"{_median([r['rss_train_peak_mb'] for r in rows]):11.0f} {threads:>8s} {load:>10.0%}")
    print(f"(tokens/s: median of {repeats}, wall clock; tok/CPU-s: real tokens per CPU-second of the trainer "
          f"process, which equals tokens/s on an idle machine with --threads 1 and is far less disturbed by "
          f"other jobs; other load: the worst run's; memory columns: medians, MB = 2^20 bytes)")
    noisy = sum(r.get("noisy", False) for rows in results.values() for r in rows)
    if noisy:
        print(f"WARNING: {noisy} run(s) kept despite other processes loading the machine; "
              "their tokens/s is pessimistic. Re-run on a quieter machine.")

    print()
    ratios = [("ours-full", "trl-full", "full FT, ours / TRL"),
              ("ours-lora", "trl-lora", "LoRA, ours / TRL"),
              ("ours-full-packed", "trl-full", "full FT, ours packed / TRL"),
              ("ours-lora-packed", "trl-lora", "LoRA, ours packed / TRL"),
              ("ours-full-packed", "trl-full-packed", "full FT, both packed"),
              ("ours-lora-packed", "trl-lora-packed", "LoRA, both packed")]
    for ours, trl, label in ratios:
        if ours in results and trl in results:
            rss = _median([r["peak_rss_mb"] for r in results[ours]]) / _median(
                [r["peak_rss_mb"] for r in results[trl]])
            print(f"{label:28s} tokens/s {summary[ours] / summary[trl]:5.2f}x   "
                  f"tok/CPU-s {per_cpu[ours] / per_cpu[trl]:5.2f}x   peak RSS {rss:5.2f}x")

    # Checks that keep the comparison honest.
    print()
    threads = {r["threads_start"] for rows in results.values() for r in rows} | {
        r["threads_end"] for rows in results.values() for r in rows}
    print(f"torch threads in every run: {sorted(threads)}" + ("" if len(threads) == 1 else "  <-- MISMATCH"))
    parities = {}
    for name, rows in results.items():
        if "packed" not in name and rows and "parity" in rows[0]:
            parities[name] = rows[0]["parity"]
    if len({json.dumps(p, sort_keys=True) for p in parities.values()}) > 1:
        print("data parity: MISMATCH " + json.dumps(parities))
    elif parities:
        counts = next(iter(parities.values()))
        print("data parity: both trainers see " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()))
    for name, rows in results.items():
        if name.startswith("ours"):
            wall = _median([r["tokens_per_s_wall"] for r in rows])
            print(f"cross-check {name}: step-end to step-end wall clock {wall:.0f} tok/s "
                  f"(metrics.jsonl: {summary[name]:.0f})")
    for name, rows in results.items():
        if name.startswith("trl"):
            print(f"{name}: optimizer {rows[0]['optim']}, attention {rows[0]['attn']}, "
                  f"activation checkpointing {rows[0]['checkpointing']}, bf16 {rows[0]['bf16']}, "
                  f"{rows[0]['trainable'] / 1e6:.3f}M trainable parameters")
    for name, rows in results.items():
        if "packed" in name and rows and "parity" in rows[0]:
            padding = rows[0].get("padding_fraction")
            print(f"{name}: {rows[0]['parity']['packs']} packs, {rows[0]['parity']['tokens']} tokens"
                  + (f", {padding:.1%} padding in our collated micro-batches" if padding is not None else ""))
    for name, rows in results.items():
        if name.startswith("ours") and not name.endswith("packed") and rows and "padding_fraction" in rows[0]:
            print(f"{name}: {rows[0]['padding_fraction']:.1%} padding in our collated micro-batches")
    for ours, trl in (("ours-full", "trl-full"), ("ours-lora", "trl-lora")):
        if ours in results and trl in results:
            same = results[ours][0]["window_tokens"] == results[trl][0]["window_tokens"]
            print(f"{ours} vs {trl}: timed window holds {'the same' if same else 'a DIFFERENT'} number of "
                  f"tokens ({results[ours][0]['window_tokens']} vs {results[trl][0]['window_tokens']})"
                  + (" (same samples: both shuffle with torch.randperm, seed 42)" if same else ""))


if __name__ == "__main__":
    main()
