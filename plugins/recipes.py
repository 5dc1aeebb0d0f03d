"""Built-in recipes; each becomes a top-level command."""

from __future__ import annotations

from automodel_cli import hookimpl

#: Pre-training starts from random weights; AdamW settings common for LLM pre-training.
PRETRAIN_DEFAULTS = {
    "model": {"from_scratch": True},
    "optim": {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1, "warmup_steps": 0.01,
              "min_lr_ratio": 0.1},
}
#: Throughput does not depend on the weights' values: random ones need no download.
BENCHMARK_DEFAULTS = {"model": {"from_scratch": True}}


@hookimpl
def register_recipes(registry):
    registry.add(
        "finetune",
        "automodel_cli.recipes.finetune:run",
        description="Supervised fine-tuning of a causal LM: full, LoRA or DoRA.",
    )
    registry.add(
        "distill",
        "automodel_cli.recipes.distill:run",
        description="Knowledge distillation from a frozen teacher (distill.teacher_path) into a student: KL + CE.",
        sections="automodel_cli.recipes.distill:CONFIG",
    )
    registry.add(
        "pretrain",
        "automodel_cli.recipes.pretrain:run",
        description="Pre-train a causal LM on raw text (packed blocks), from random weights or on from a checkpoint.",
        defaults=PRETRAIN_DEFAULTS,
    )
    registry.add(
        "benchmark",
        "automodel_cli.recipes.benchmark:run",
        description="Measure training throughput: tokens/s, step time, TFLOP/s, MFU and peak memory per device.",
        defaults=BENCHMARK_DEFAULTS,
        sections="automodel_cli.recipes.benchmark:CONFIG",
        json_output="benchmark.json",
    )
