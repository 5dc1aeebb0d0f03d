"""Peak memory of one training step of a tiny-hidden, large-vocabulary model, per loss path.

Usage::

    python benchmarks/loss_memory.py                     # Llama-3 vocabulary, 4 x 1024 tokens
    python benchmarks/loss_memory.py --runs hf,linear_ce --repeats 3

The model is a random-init ``LlamaForCausalLM`` with Llama 3's vocabulary (128256 tokens, tied
embeddings as in Llama 3.2 1B) and a tiny decoder (hidden 256, 2 layers), fp32 on CPU, so the
vocabulary projection dominates: the logits of 4 x 1024 tokens are 4096 x 128256 fp32 = 2.1 GB.
Every token is trained (pretraining-style labels): the loss paths cannot skip any position, which
is the worst case for ours.

One training step = forward, loss, backward, ``AdamW.step()``, ``zero_grad``; ``--steps`` (2)
steps run and the last one is timed. Paths:

- ``hf``: Hugging Face's default, ``model(input_ids, labels=labels).loss`` (full logits, fp32
  upcast, ``F.cross_entropy``).
- ``masked_ce`` / ``chunked_ce`` / ``linear_ce``: ``automodel``'s ``training_loss`` with that loss
  (``components/loss/head.py``), exactly what ``automodel finetune loss.name=...`` runs.

Distillation paths (a frozen teacher of the same shape, another random init; ``loss = 0.5 * CE +
0.5 * T^2 * KL`` at T = 2, every token trained):

- ``kd-naive``: the textbook PyTorch recipe, full logits of both models,
  ``0.5 * model(..., labels=labels).loss + 0.5 * T^2 * F.kl_div(log_softmax(s / T),
  log_softmax(t / T), log_target=True, reduction="sum") / tokens``.
- ``kd-masked_ce``: ``automodel distill``'s full-logits path (masked_ce + the chunked ``kd_loss``).
- ``kd-linear_ce``: ``automodel distill loss.name=linear_ce``: the teacher's logits at the trained
  rows only, CE and KL from the student's hidden states chunk by chunk
  (``head.distillation_training_loss``).

Each path runs in a fresh process. ``peak RSS`` is the process's ``ru_maxrss`` (imports, model,
optimizer state and the step); ``step peak`` is that minus the RSS just before the first step
(what the step itself adds). All paths compute the same loss (printed, to check).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

RESULT_PREFIX = "LOSS_MEMORY "
PATHS = ("hf", "masked_ce", "chunked_ce", "linear_ce")
DISTILL_PATHS = ("kd-naive", "kd-masked_ce", "kd-linear_ce")
TEMPERATURE = 2.0


def child(spec: dict) -> None:
    import resource

    import psutil
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from automodel_cli.components.loss.head import training_loss
    from automodel_cli.components.loss.spec import LossSpec
    from automodel_cli.plugin_host import get_registries

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["hidden"] * 4,
                         num_hidden_layers=spec["layers"], num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=spec["seq"], tie_word_embeddings=True, use_cache=False)
    model = LlamaForCausalLM(config).float().train()
    teacher = None
    if path_is_distill(spec["path"]):
        torch.manual_seed(7)
        teacher = LlamaForCausalLM(config).float().eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), generator=generator)
    labels = input_ids.clone()
    n_tokens = int((labels[:, 1:] != -100).sum())
    path = spec["path"]
    loss_spec = None
    if path not in ("hf", "kd-naive"):
        loss_name = path.removeprefix("kd-")
        loss_spec = LossSpec.of(get_registries().losses.get(loss_name).load()).configured(
            {"chunk_size": spec["chunk_size"]})

    rss_before = psutil.Process().memory_info().rss
    losses, seconds = [], 0.0
    for _ in range(spec["steps"]):
        started = time.perf_counter()
        if path == "hf":
            loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss
        elif teacher is not None:
            loss = distillation_step(path, model, teacher, input_ids, labels, n_tokens, loss_spec)
        else:
            loss = training_loss(model, {"input_ids": input_ids}, labels, n_tokens, loss_spec)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        losses.append(loss.item())
        del loss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(RESULT_PREFIX + json.dumps({
        "path": path, "peak_rss_mb": peak / 2**20, "rss_before_mb": rss_before / 2**20,
        "step_peak_mb": (peak - rss_before) / 2**20, "last_step_s": seconds, "losses": losses,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "threads": torch.get_num_threads(),
    }), flush=True)


def path_is_distill(path: str) -> bool:
    return path.startswith("kd-")


def distillation_step(path, model, teacher, input_ids, labels, n_tokens, loss_spec):
    """The loss of one distillation step (``0.5 * CE + 0.5 * T^2 * KL``) along ``path``."""
    import torch
    import torch.nn.functional as F

    from automodel_cli.components.loss.head import distillation_training_loss
    from automodel_cli.components.loss.kd import distillation_loss, kd_loss

    kd = {"kd_weight": 0.5, "temperature": TEMPERATURE}
    inputs = {"input_ids": input_ids}
    if path == "kd-linear_ce":
        terms = distillation_training_loss(model, teacher, inputs, labels, n_tokens, loss_spec, direction="forward",
                                           **kd)
        assert terms is not None, "the heads did not fuse"
        return terms[0]
    with torch.no_grad():
        teacher_logits = teacher(**inputs, use_cache=False).logits
    if path == "kd-naive":
        output = model(**inputs, labels=labels, use_cache=False)
        log_q = F.log_softmax(output.logits[:, :-1] / TEMPERATURE, dim=-1)
        log_p = F.log_softmax(teacher_logits[:, :-1] / TEMPERATURE, dim=-1)
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum") / n_tokens
        return 0.5 * output.loss + 0.5 * TEMPERATURE**2 * kl
    logits = model(**inputs, use_cache=False).logits
    ce = loss_spec.logits_fn(logits, labels, n_tokens)
    kl = kd_loss(logits, teacher_logits, labels, n_tokens, temperature=TEMPERATURE)
    return distillation_loss(ce, kl, **kd)


def run_path(path: str, args: argparse.Namespace) -> dict:
    spec = {"path": path, "vocab": args.vocab, "hidden": args.hidden, "layers": args.layers, "batch": args.batch,
            "seq": args.seq, "steps": args.steps, "chunk_size": args.chunk_size}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(spec)],
                          capture_output=True, text=True,
                          env={**os.environ, "TRANSFORMERS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode or not lines:
        raise SystemExit(f"{path} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=None, help="loss.NAME.chunk_size (default: automatic)")
    parser.add_argument("--runs", default=",".join(PATHS),
                        help=f"comma-separated subset of {', '.join(PATHS + DISTILL_PATHS)}")
    parser.add_argument("--distill", action="store_true", help=f"shorthand for --runs {','.join(DISTILL_PATHS)}")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per path (median reported)")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        child(json.loads(args._child))
        return

    import statistics

    import torch
    import transformers

    names = list(DISTILL_PATHS) if args.distill else [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = set(names) - set(PATHS + DISTILL_PATHS)
    if unknown:
        parser.error(f"unknown path(s) {sorted(unknown)}; choose from {PATHS + DISTILL_PATHS}")
    print("$ " + shlex.join([Path(sys.executable).name, *sys.argv]))
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    print(f"machine: {cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; python "
          f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")
    logits_gb = args.batch * args.seq * args.vocab * 4 / 1e9
    print(f"model: Llama, vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, tied embeddings, fp32; "
          f"batch {args.batch} x {args.seq} tokens (full fp32 logits: {logits_gb:.2f} GB)", flush=True)

    results: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        for name in names:
            result = run_path(name, args)
            results[name].append(result)
            print(f"  [{repeat + 1}/{args.repeats}] {name:12s} peak RSS {result['peak_rss_mb']:7.0f} MB  step peak "
                  f"{result['step_peak_mb']:7.0f} MB  step {result['last_step_s']:6.2f} s  "
                  f"losses {', '.join(f'{x:.5f}' for x in result['losses'])}", flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    print()
    print(f"{'path':12s} {'peak RSS MB':>12s} {'step peak MB':>13s} {'step s':>7s} {'vs peer (peak RSS)':>19s} "
          f"{'vs peer (step peak)':>20s}   (peer: hf, or kd-naive for kd-*)")
    for name in names:
        vs = vs_step = ""
        peer = "kd-naive" if path_is_distill(name) else "hf"
        if peer in results:
            vs = f"{median(name, 'peak_rss_mb') / median(peer, 'peak_rss_mb'):.2f}x"
            vs_step = f"{median(name, 'step_peak_mb') / median(peer, 'step_peak_mb'):.2f}x"
        print(f"{name:12s} {median(name, 'peak_rss_mb'):12.0f} {median(name, 'step_peak_mb'):13.0f} "
              f"{median(name, 'last_step_s'):7.2f} {vs:>19s} {vs_step:>20s}")
    print(f"(medians of {args.repeats}; MB = 2^20 bytes; torch threads {results[names[0]][0]['threads']})")


if __name__ == "__main__":
    main()
