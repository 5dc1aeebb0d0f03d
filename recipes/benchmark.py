"""``automodel benchmark``: training throughput of a model on this machine.

Reports, per device: tokens/s, step time (mean, p50, p90), achieved TFLOP/s, MFU and peak
memory. ``benchmark.warmup_steps`` untimed steps come first (allocator growth, kernel selection,
compilation), then ``benchmark.steps`` timed ones. Each step is a whole training step --
forward, loss, backward, gradient clipping, AdamW -- on ``benchmark.batch_size`` sequences of
``benchmark.seq_len`` tokens per data-parallel rank, with the same precision, loss and
parallelism settings (``model.dtype``, ``loss.name``, ``train.activation_checkpointing``,
``train.compile``, ``distributed.*``, ``--nproc-per-node``) as finetune and pretrain.

Data: random token ids by default (``benchmark.synthetic=true``: no tokenizer, no download), or
blocks of ``data.path`` text read as pretrain reads them. Weights: random from the model's
config by default (presets ship their configs, so ``automodel benchmark llama3.1-8b`` needs no
network), or loaded with ``model.from_scratch=false``.

FLOPs per token, the peak table and what "peak memory" measures: components/training/flops.py
and docs/benchmark.md. The recipe writes nothing to disk. With ``benchmark.json=true`` (``--json``)
stdout holds exactly one JSON object; every other message goes to stderr.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from typing import Any

from automodel_cli.config.schema import option
from automodel_cli.errors import UserError

RECIPE = "benchmark"
#: The recipe's own config section, ``benchmark`` (read by this recipe only); the device peak
#: for MFU is the core ``train.peak_tflops``.
CONFIG = {"benchmark": {
    "warmup_steps": option(int, 3, "Untimed steps before measuring (allocator, kernel selection, compilation).", ge=0),
    "steps": option(int, 10, "Timed training steps.", ge=1),
    "seq_len": option(int, 2048, "Tokens per sequence.", ge=2),
    "batch_size": option(int, 1, "Sequences per data-parallel rank per step.", ge=1),
    "synthetic": option(bool, True, "Random token ids (no tokenizer or data); false: blocks of data.path text as pretrain reads them."),
    "json": option(bool, False, "Print exactly one JSON object on stdout and nothing else (--json)."),
}}


def run(context: Any) -> int:
    import torch

    from automodel_cli.components.loss.head import training_loss
    from automodel_cli.components.models.loading import load_config
    from automodel_cli.components.peft.lora import count_parameters
    from automodel_cli.components.training import flops as flops_math
    from automodel_cli.training.loop import printer, step_rates
    from automodel_cli.training.run import TrainingRun
    from automodel_cli.training.text_data import check_block_size

    bench = context.config.benchmark

    # 1. Processes, mesh, loss, precision; no run directory. Messages go to stderr when stdout is
    #    reserved for the JSON result.
    with TrainingRun(context, output=False, stream=sys.stderr if bench.json else None) as run:
        cfg, env = run.cfg, run.env
        progress = printer(env.is_main, sys.stderr)

        # 2. Architecture and data: each step gives every data-parallel rank batch_size sequences.
        architecture = load_config(cfg.model)
        check_block_size(bench.seq_len, architecture, key="benchmark.seq_len")
        if run.sequence_parallel and bench.seq_len % run.shape.tp:
            raise UserError(f"Sequence parallelism splits every sequence over tp={run.shape.tp} ranks, but "
                            f"benchmark.seq_len={bench.seq_len} is not a multiple of {run.shape.tp}.",
                            f"Set benchmark.seq_len to a multiple of {run.shape.tp}.")
        step_batches = _batches(cfg, run.registries, architecture, run.dp_size, run.say)

        # 3. Model (built empty, FLOPs counted on the bare model, shards loaded) and optimizer,
        #    without a schedule.
        model = run.load_model(flops_seq_len=bench.seq_len)
        run.build_optimizer(None)
        _, parameters = count_parameters(model)
        run.say(f"model: {cfg.model.path} ({parameters / 1e6:.2f}M parameters, {run.precision.describe()}, "
                f"{run.shape.describe()}); {bench.batch_size} x {bench.seq_len} tokens per data-parallel rank per step")

        # 4. Warm-up, then timed steps: each a whole training step, waited for.
        flops_math.reset_peak_memory(run.precision.device)
        times: list[float] = []
        loss = None
        for index, step in enumerate(itertools.islice(step_batches, bench.warmup_steps + bench.steps)):
            started = time.perf_counter()
            batch, label_tokens = step[run.dp_index]
            inputs = {k: v.to(run.precision.device) for k, v in batch.items() if k in ("input_ids", "position_ids")}
            loss = training_loss(model, inputs, batch["labels"], label_tokens, run.loss_spec, run.precision.autocast)
            loss.backward()
            run.optimizer_step()
            loss = loss.detach().float().item()  # waits for the device
            if run.precision.device.type == "cuda":
                torch.cuda.synchronize(run.precision.device)
            elapsed = time.perf_counter() - started
            warm = index < bench.warmup_steps
            if not warm:
                times.append(elapsed)
            progress(f"{'warm-up' if warm else 'step'} {index + 1 - (0 if warm else bench.warmup_steps)}: "
                     f"{elapsed * 1000:.1f} ms, loss {loss:.4f}")

        # 5. Results (memory: the largest over the ranks).
        memory, memory_kind = flops_math.peak_memory(run.precision.device)
        if env.distributed:
            import torch.distributed as dist

            peak_bytes = torch.tensor([memory], dtype=torch.long, device=env.device)
            dist.all_reduce(peak_bytes, op=dist.ReduceOp.MAX)
            memory = int(peak_bytes.item())
        tokens_per_step = run.dp_size * bench.batch_size * bench.seq_len
        stats = flops_math.step_time_stats(times)
        tflops, mfu = flops_math.achieved(run.flops.total * tokens_per_step, stats["mean"], env.world_size, run.peak)
        result = {
            "model": cfg.model.path, "model_type": architecture.model_type, "parameters": parameters,
            "weights": "random" if cfg.model.from_scratch else "pretrained",
            "device": flops_math.device_name(run.precision.device), "devices": env.world_size,
            "mesh": run.shape.as_dict(), "precision": run.precision.describe(),
            "data": "synthetic" if bench.synthetic else (cfg.data.path or cfg.data.name),
            "seq_len": bench.seq_len, "batch_size_per_rank": bench.batch_size, "tokens_per_step": tokens_per_step,
            "warmup_steps": bench.warmup_steps, "steps": len(times),
            "step_time_s": stats, "step_times_s": times,
            **step_rates(tokens_per_step, stats["mean"], env.world_size),
            "flops_per_token": run.flops.as_dict(), "tflops_per_s_per_device": tflops,
            "peak_tflops_per_device": run.peak, "peak_source": run.peak_source, "mfu": mfu,
            "peak_memory_bytes": memory, "peak_memory_gib": memory / 2**30, "memory_measure": memory_kind,
            "final_loss": loss,
        }
        if env.is_main:
            print(json.dumps(result, indent=2) if bench.json else _report(result), flush=True)
        run.end()
    return 0


def _batches(cfg: Any, registries: Any, architecture: Any, dp_size: int, say: Any):
    """Endless steps; a step is one ``(batch, label_tokens)`` per data-parallel rank, where
    ``label_tokens`` counts the step's trained tokens over all ranks (the loss normaliser)."""
    import torch

    bench = cfg.benchmark
    rows = bench.batch_size * dp_size
    if bench.synthetic:
        generator = torch.Generator().manual_seed(cfg.train.seed)
        while True:
            ids = torch.randint(0, architecture.vocab_size, (rows, bench.seq_len), generator=generator)
            yield [({"input_ids": part, "labels": part}, rows * (bench.seq_len - 1))
                   for part in ids.split(bench.batch_size)]
    from automodel_cli.components.data.text import BlockStream, TokenBlocks, collate_blocks
    from automodel_cli.components.models.loading import load_tokenizer
    from automodel_cli.training.text_data import open_text

    tokenizer = load_tokenizer(cfg.model)
    source = open_text(cfg, registries, tokenizer, cfg.data.path, cfg.data.split, cfg.data.streaming,
                       say, "benchmark")
    if callable(source):
        stream = BlockStream(source, bench.seq_len, source=f"The text data `{cfg.data.path}`")
        blocks = iter(stream.next_block, None)
    else:
        table = TokenBlocks(source, bench.seq_len)
        if len(table) == 0:
            raise UserError(f"The text data `{cfg.data.path}` has fewer than benchmark.seq_len={bench.seq_len} tokens.",
                            "Add text, lower benchmark.seq_len, or use benchmark.synthetic=true.")
        blocks = (table[i % len(table)] for i in itertools.count())
    flash = str(cfg.model.attn_implementation or "").startswith("flash")
    while True:
        step = [next(blocks) for _ in range(rows)]
        label_tokens = sum(block["label_tokens"] for block in step)
        yield [(collate_blocks(step[i:i + bench.batch_size], flatten=flash), label_tokens)
               for i in range(0, rows, bench.batch_size)]


def _report(result: dict[str, Any]) -> str:
    stats = result["step_time_s"]
    mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a (no peak known; set train.peak_tflops)"
    peak = (f"{result['peak_tflops_per_device']:g} TFLOP/s ({result['peak_source']})"
            if result["peak_tflops_per_device"] else "unknown")
    fpt = result["flops_per_token"]
    lines = [
        f"benchmark: {result['model']} ({result['model_type']}, {result['parameters'] / 1e6:.1f}M parameters, "
        f"{result['weights']} weights) on {result['devices']} x {result['device']}, {result['precision']}",
        f"  data:            {result['data']}, {result['batch_size_per_rank']} x {result['seq_len']} tokens per rank, "
        f"{result['tokens_per_step']} tokens per step",
        f"  steps:           {result['steps']} timed after {result['warmup_steps']} warm-up",
        f"  step time:       mean {stats['mean'] * 1000:.1f} ms, p50 {stats['p50'] * 1000:.1f} ms, "
        f"p90 {stats['p90'] * 1000:.1f} ms",
        f"  tokens/s:        {result['tokens_per_s']:,.0f} ({result['tokens_per_s_per_device']:,.0f} per device)",
        f"  FLOPs/token:     {fpt['total']:.4g} (6 x {fpt['matmul_parameters'] / 1e6:.2f}M matmul weights "
        f"+ attention {fpt['attention']:.4g})",
        f"  TFLOP/s/device:  {result['tflops_per_s_per_device']:.3f}; peak {peak}",
        f"  MFU:             {mfu}",
        f"  peak memory:     {result['peak_memory_gib']:.2f} GiB ({result['memory_measure']})",
    ]
    if fpt.get("note"):
        lines.append(f"  note:            {fpt['note']}")
    return "\n".join(lines)
