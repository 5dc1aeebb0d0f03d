"""The configuration schema: every key a user may set, its type, default and meaning.

The schema is plain data so that validation, ``config show``, docs/config.md and error
suggestions all come from one place. Keys marked ``open`` hold free-form mappings passed through
to a library or plugin (for example ``model.config`` overrides of the HF config).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NoneType = type(None)


@dataclass(frozen=True)
class Key:
    """One configuration key.

    ``ge``/``gt``/``le``/``lt`` bound a numeric value: a number outside its range would train
    the wrong thing or fail deep inside torch, so it is refused with the other config problems.
    ``check`` is the rule for the few keys a range cannot describe: it returns why a value is
    wrong, or None; ``check_doc`` states the rule for docs and messages.
    """

    types: tuple[type, ...]
    default: Any
    doc: str
    choices: tuple[Any, ...] | None = None
    open: bool = False  # a mapping whose sub-keys are not checked
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    check: Callable[[Any], str | None] | None = None
    check_doc: str | None = None

    def type_name(self) -> str:
        names = {
            int: "an integer", float: "a number", bool: "true or false", str: "a string",
            list: "a list", dict: "a mapping", NoneType: "null",
        }
        if self.choices:
            return " | ".join(repr(c) if not isinstance(c, str) else c for c in self.choices)
        return " or ".join(names.get(t, t.__name__) for t in self.types)

    def range_text(self) -> str | None:
        """The valid range in words (">= 1", "0 <= x < 1"), or None for an unbounded key."""
        if self.check_doc:
            return self.check_doc
        low = (">=", self.ge) if self.ge is not None else (">", self.gt) if self.gt is not None else None
        high = ("<=", self.le) if self.le is not None else ("<", self.lt) if self.lt is not None else None
        if low and high:
            return f"{_num(low[1])} {low[0].replace('>', '<')} x {high[0]} {_num(high[1])}"
        if low or high:
            op, bound = low or high
            return f"{op} {_num(bound)}"
        return None

    def range_problem(self, value: Any) -> str | None:
        """Why ``value`` (already of a valid type) is out of range, or None when it is fine."""
        if value is None or isinstance(value, bool):
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        if isinstance(value, (int, float)) and not (
                (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt)):
            return f"must be {self.range_text()}" + (" (or null)" if NoneType in self.types else "")
        return self.check(value) if self.check is not None else None


def _num(value: float) -> str:
    """A bound as written in docs: 1 rather than 1.0."""
    return str(int(value)) if float(value).is_integer() else str(value)


def _k(types: type | tuple[type, ...], default: Any, doc: str, **kw: Any) -> Key:
    return Key(types if isinstance(types, tuple) else (types,), default, doc, **kw)


def _eval_size_problem(value: Any) -> str | None:
    if (isinstance(value, float) and not 0 <= value < 1) or (isinstance(value, int) and value < 0):
        return "must be a sample count (an integer >= 0) or a fraction 0 <= x < 1"
    return None


def _betas_problem(value: Any) -> str | None:
    numbers = [b for b in value if isinstance(b, (int, float)) and not isinstance(b, bool)]
    if len(value) != 2 or len(numbers) != 2 or not all(0 <= b < 1 for b in numbers):
        return "must be two numbers 0 <= b < 1, e.g. [0.9, 0.999]"
    return None


def _dp_shard_problem(value: Any) -> str | None:
    return None if value == -1 or value >= 1 else "must be -1 (the rest of the world size) or >= 1"


OPT_STR = (str, NoneType)
OPT_INT = (int, NoneType)

#: The core sections every recipe may read: section -> key -> Key; ``recipe`` and
#: ``output_dir`` are top-level scalars. Recipes add their own sections and registry entries
#: their option tables (``compose.compose_schema``).
CORE: dict[str, dict[str, Key] | Key] = {
    "model": {
        "path": _k(OPT_STR, None, "Hugging Face hub id or local model directory."),
        "preset": _k(OPT_STR, None, "The model preset TARGET named (set by the command); its options, if it declares any, are model.PRESET.*."),
        "tokenizer": _k(OPT_STR, None, "Tokenizer hub id or directory; defaults to model.path."),
        "revision": _k(OPT_STR, None, "Hub revision (branch, tag or commit) of model.path."),
        "from_scratch": _k(bool, False, "Initialise weights randomly from the model config instead of loading them."),
        "meta_init": _k(bool, True, "Build the model on the meta device and read only each process's shards from the safetensors files; false loads the whole model in every process first (architectures whose construction needs real tensors)."),
        "config": _k(dict, {}, "Overrides applied to the model's HF config (e.g. num_hidden_layers).", open=True),
        "trust_remote_code": _k(bool, False, "Run modelling code shipped with the checkpoint. Off unless you trust it."),
        "dtype": _k(str, "auto", "Parameter dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.",
                    choices=("auto", "float32", "bfloat16", "float16")),
        "attn_implementation": _k(OPT_STR, None, "Attention backend passed to from_pretrained (sdpa, eager, flash_attention_2)."),
        "chat_template": _k(OPT_STR, None, "Jinja chat template overriding the tokenizer's own."),
        "experts_kernel": _k(str, "auto", "Mixture-of-experts models: how each process computes its experts' tokens: grouped_mm (one grouped GEMM per projection), loop (one matrix product per expert), auto (grouped_mm where it runs); docs/moe.md.",
                             choices=("auto", "grouped_mm", "loop")),
        "freeze_vision": _k(bool, True, "Vision-language models: keep the vision tower's weights fixed (the projector is set by model.freeze_projector); text-only models ignore it."),
        "freeze_projector": _k(bool, False, "Vision-language models: keep the projector (the layers mapping image features into the language model, e.g. multi_modal_projector, Qwen-VL's visual.merger) fixed; text-only models ignore it."),
    },
    "data": {
        "name": _k(str, "auto", "Dataset from the dataset registry; auto picks the instruction loader for data.path."),
        "path": _k(OPT_STR, None, "Training data: a local jsonl/json/parquet/csv file or directory, or a hub dataset id."),
        "split": _k(str, "train", "Split of data.path to train on."),
        "eval_path": _k(OPT_STR, None, "Validation data (same formats as data.path)."),
        "eval_split": _k(OPT_STR, None, "Split used for validation when data.eval_path is a hub dataset or data.path has one."),
        "eval_size": _k((int, float), 0, "Hold out this many samples (int) or this fraction (float) of the training data for validation.",
                        check=_eval_size_problem, check_doc="an integer >= 0 or a fraction 0 <= x < 1"),
        "prompt_column": _k(str, "prompt", "Column holding the prompt."),
        "completion_column": _k(str, "completion", "Column holding the completion (the trained tokens)."),
        "messages_column": _k(str, "messages", "Column holding chat messages, rendered with the chat template."),
        "max_length": _k(int, 2048, "Maximum tokens per sample (longer samples are truncated, with a warning); pretrain: the length of every block.", ge=2),
        "packing": _k(bool, False, "Pack samples into max_length sequences without cross-document attention."),
        "shuffle": _k(bool, True, "Shuffle the training data each epoch (seeded)."),
        "options": _k(dict, {}, "Extra keyword arguments for the dataset plugin.", open=True),
        "text_column": _k(str, "text", "Column holding the documents for pretrain (.txt files: one document per blank-line-separated paragraph)."),
        "streaming": _k(bool, False, "pretrain: read data.path lazily, in order (datasets streaming); the position is checkpointed."),
        "num_proc": _k(OPT_INT, None, "Processes tokenising text for pretrain (map-style data; null: one).", ge=1),
        "min_pixels": _k(OPT_INT, None, "Vision-language models with a dynamic resolution (Qwen2-VL style): smallest image area in pixels after resizing (null: the processor's own).", ge=1),
        "max_pixels": _k(OPT_INT, None, "Vision-language models with a dynamic resolution: largest image area in pixels after resizing; fewer pixels, fewer image tokens (null: the processor's own).", ge=1),
    },
    "peft": {
        "method": _k(str, "none", "Parameter-efficient method: none (full fine-tuning), lora, dora or qlora (LoRA on a base whose decoder linear weights are quantized as they load, peft.quantization; sharded by FSDP2 on several processes, no tp/pp/cp; docs/performance.md).",
                     choices=("none", "lora", "dora", "qlora")),
        "quantization": _k(str, "nf4", "How peft.method=qlora stores the frozen base's decoder linear weights: nf4 (4-bit NormalFloat blocks of 64 with double-quantized scales, torchao; `pip install 'automodel-cli[qlora]'`) or int8 (per-row absmax, plain PyTorch).",
                           choices=("nf4", "int8")),
        "rank": _k(int, 8, "LoRA rank r.", ge=1),
        "alpha": _k((int, float), 16, "LoRA alpha (scaling = alpha / rank).", gt=0),
        "dropout": _k((int, float), 0.0, "Dropout on the LoRA input.", ge=0, lt=1),
        "target_modules": _k((str, list), "all-linear", "Modules to adapt: all-linear (every decoder linear layer; for a vision-language model, the language model's only) or a list of names."),
        "merge": _k(bool, False, "Also write the base model with the adapter merged into final/merged."),
        "moe_experts": _k((bool, NoneType), None, "Mixture-of-experts models: whether all-linear adapts the experts' projections (null: yes, unless distributed.ep > 1 shards them; true with ep > 1 is refused)."),
        "moe_router": _k(bool, False, "Mixture-of-experts models: also adapt the router (which experts each token goes to); off by default."),
    },
    "train": {
        "max_steps": _k(OPT_INT, None, "Optimizer steps to run; overrides train.epochs when set.", ge=1),
        "epochs": _k(int, 1, "Passes over the training data (used when train.max_steps is null).", ge=1),
        "global_batch_size": _k(int, 8, "Samples per optimizer step across all devices: the unit of a run.", ge=1),
        "micro_batch_size": _k(int, 2, "Samples per forward pass on one device; accumulation is derived.", ge=1),
        "seed": _k(int, 42, "Seed for model init, data order and dropout.", ge=0, le=2**32 - 1),
        "max_grad_norm": _k((int, float, NoneType), 1.0, "Clip gradients to this global norm (null: no clipping).", gt=0),
        "eval_every_steps": _k(OPT_INT, None, "Validate every N optimizer steps (and at the start and end).", ge=1),
        "eval_batches": _k(OPT_INT, None, "Cap on validation batches per evaluation (null: the whole split).", ge=1),
        "eval_generate": _k(bool, False, "finetune: at every validation also generate answers (greedy) for the first train.eval_generate_samples validation prompts and log eval_generate_exact_match and eval_generate_contains (docs/evaluate.md)."),
        "eval_generate_samples": _k(int, 32, "Validation samples whose answers train.eval_generate generates.", ge=1),
        "eval_max_new_tokens": _k(int, 64, "Most tokens train.eval_generate generates per answer (every rank decodes the same number of steps).", ge=1),
        "activation_checkpointing": _k((bool, str), False, "Recompute decoder-layer activations in backward to save memory: none (false), full (true: every layer) or selective (every other layer); docs/performance.md has the trade-off.",
                                       choices=(False, True, "none", "full", "selective", "false", "true")),
        "compile": _k(bool, False, "torch.compile each decoder layer (the first steps compile; later ones run faster)."),
        "compile_backend": _k(str, "inductor", "torch.compile backend used by train.compile (inductor, aot_eager, eager, ...)."),
        "precision": _k(str, "auto", "Matrix-product precision: auto (model.dtype's policy: bf16 on GPU, fp32 on CPU) or fp8 (the decoder's linear layers train in float8 with torchao; a CUDA GPU of compute capability 8.9+ and `pip install 'automodel-cli[fp8]'`; docs/performance.md).",
                        choices=("auto", "fp8")),
        "fp8_recipe": _k(str, "tensorwise", "Float8 scaling with train.precision=fp8: tensorwise (one scale per tensor, fastest; float8 all-gathers under FSDP2) or rowwise (one scale per row, more accurate with outliers).",
                         choices=("tensorwise", "rowwise")),
        "peak_tflops": _k((int, float, NoneType), None, "Peak TFLOP/s of one device for MFU (logged by pretrain and benchmark); null: the built-in bf16 table, none on CPU.", gt=0),
        "log_every_steps": _k(int, 1, "Update the progress bar and loggers every N steps (metrics.jsonl gets every step).", ge=1),
    },
    "optim": {
        "name": _k(str, "adamw", "Optimizer from the optimizer registry: adamw, sgd, adafactor, adamw8bit, muon, ... (`automodel list optimizers`); its own options are optim.NAME.*."),
        "lr": _k((int, float, NoneType), None, "Peak learning rate; null: 1e-4 with LoRA/DoRA, 2e-5 for full fine-tuning.", gt=0),
        "weight_decay": _k((int, float), 0.0, "Weight decay of the weight matrices (decoupled for AdamW; biases and norms get none).", ge=0),
        "betas": _k(list, [0.9, 0.999], "Betas of AdamW (also adamw8bit, and muon's AdamW part).", check=_betas_problem, check_doc="two numbers 0 <= b < 1"),
        "eps": _k((int, float), 1e-8, "Epsilon of AdamW (also adamw8bit, and muon's AdamW part).", gt=0),
        "scheduler": _k(str, "cosine", "Learning-rate schedule from the schedule registry: cosine, linear, constant, wsd, ... (`automodel list schedulers`); its own options are optim.NAME.*."),
        "warmup_steps": _k((int, float), 0, "Warmup steps (int) or fraction of all steps (float < 1).", ge=0),
        "min_lr_ratio": _k((int, float), 0.0, "Final learning rate as a fraction of optim.lr.", ge=0, le=1),
    },
    "loss": {
        "name": _k(str, "masked_ce", "Loss from the loss registry: masked_ce, chunked_ce, linear_ce (fused LM head, for large vocabularies), ... (`automodel list losses`)."),
    },
    "moe": {
        "aux_loss_coef": _k((int, float, NoneType), None, "Mixture-of-experts models: weight of the router's load-balancing loss added to the training loss (null: the model config's router_aux_loss_coef; 0: logged, not trained). Dense models ignore it; docs/moe.md.", ge=0),
        "z_loss_coef": _k((int, float, NoneType), None, "Mixture-of-experts models: weight of the router z-loss (mean of logsumexp(router logits)^2; null: the config's router_z_loss_coef, else 0 and not computed).", ge=0),
        "log_expert_load": _k(bool, True, "Mixture-of-experts models: log the tokens per expert of every layer (expert_load_max_mean and per-layer metrics, histograms for TensorBoard and wandb)."),
    },
    "distributed": {
        "dp_replicate": _k(int, 1, "Data-parallel replica groups (HSDP when > 1: shard inside a group, replicate across).", ge=1),
        "dp_shard": _k(int, -1, "FSDP2 shard group size (-1: whatever remains of the world size).",
                       check=_dp_shard_problem, check_doc="-1 or >= 1"),
        "tp": _k(int, 1, "Tensor-parallel degree (plans from the parallel-plan registry, by model_type).", ge=1),
        "cp": _k(int, 1, "Context-parallel degree: each sequence is split over cp ranks that read the same samples (zig-zag load balancing, exact attention across the split); world size = dp_replicate x dp_shard x cp x tp; docs/distributed.md.", ge=1),
        "ep": _k(int, 1, "Expert-parallel degree for mixture-of-experts models: each group of ep neighbouring dp_shard ranks splits every layer's experts ep ways (must divide dp_shard and the number of experts); docs/moe.md.", ge=1),
        "sequence_parallel": _k(bool, False, "Shard norms and dropout along the sequence inside the tensor-parallel group."),
        "pp": _k(int, 1, "Pipeline-parallel degree: the decoder layers are split into pp stages (embedding on the first, norm + LM head + loss on the last), each on its own group of ranks; world size = pp x dp_replicate x dp_shard x cp x tp; docs/distributed.md.", ge=1),
        "pp_schedule": _k(str, "1f1b", "Pipeline schedule: gpipe (all forwards, then all backwards), 1f1b (one forward, one backward: fewer micro-batches in flight), interleaved_1f1b (pp_virtual_stages stages per rank: a smaller bubble).",
                          choices=("gpipe", "1f1b", "interleaved_1f1b")),
        "pp_virtual_stages": _k(OPT_INT, None, "Stages per pipeline rank for interleaved_1f1b (null: 2 for interleaved_1f1b, 1 for the others).", ge=1),
        "pp_split": _k((list, NoneType), None, "Manual pipeline split: the first decoder layer of every stage after the first (pp x virtual stages - 1 increasing layer indices); null: balanced by the memory plan's per-layer cost."),
        "auto": _k(bool, False, "Choose pp, dp, cp, tp, the micro-batch and activation checkpointing for the launched processes from the memory plan and a step-time model; `automodel plan` and --dry-run print the candidates (docs/distributed.md, \"Automatic layout\")."),
    },
    "checkpoint": {
        "every_steps": _k(OPT_INT, None, "Save a resumable checkpoint every N optimizer steps.", ge=1),
        "keep": _k(int, 2, "How many recent checkpoints to keep.", ge=1),
        "resume": _k((str, bool, NoneType), "off", "auto (latest in output_dir), a checkpoint path, or off."),
        "async": _k(bool, False, "Write checkpoints in the background: the shards are copied to host memory and written while training continues; the checkpoint is published (meta.json, rename, latest) once written."),
        "allow_changes": _k(bool, False, "On resume, apply changed optimizer and schedule settings (optim.*, train.max_steps, train.epochs, train.max_grad_norm) from the resumed step on; without it such a resume is refused, listing the changes."),
    },
    "logging": {
        "loggers": _k(list, [], "Extra metric loggers (metrics.jsonl is always written): wandb, tensorboard, ..."),
        "progress": _k(bool, True, "Show a progress bar."),
    },
    "launch": {
        "launcher": _k(str, "local", "Launcher from the launcher registry: local, slurm, k8s, ... (also --launcher)."),
        "nodes": _k(int, 1, "Nodes (machines) for the job; > 1 needs a cluster launcher (also --nodes).", ge=1),
        "nproc_per_node": _k(OPT_INT, None, "Processes per node; > 1 starts torchrun (also --nproc-per-node; --gpus-per-node sets it too).", ge=1),
        "gpus_per_node": _k(OPT_INT, None, "GPUs a cluster launcher requests per node (also --gpus-per-node, which runs one process per GPU).", ge=0),
        "device_memory_gib": _k((int, float, NoneType), None, "GiB of memory of one GPU of the job (on CPU: of one node) that the memory plan checks the peak against; null: this machine's when the processes run here, no verdict for a cluster job (docs/memory.md).", gt=0),
        "job_name": _k(OPT_STR, None, "Name of the cluster job; default: the output directory's name."),
        "env": _k(dict, {}, "Environment variables set for every process of a cluster job (secrets: pass them through the cluster instead).", open=True),
        "setup": _k(list, [], "Shell commands run on each node before training (module load, source venv, ...)."),
        "rdzv_port": _k(int, 29500, "TCP port of torchrun's c10d rendezvous on the first node of a multi-node job.", ge=1, le=65535),
    },
    "recipe": _k(OPT_STR, None, "Recipe this config is for (finetune, pretrain, ...); `automodel launch FILE` reads it."),
    "output_dir": _k(OPT_STR, None, "Where the run writes final/, metrics.jsonl, checkpoints and its config."),
}


#: Sections of recipes that a built-in command also reads when that recipe is installed:
#: ``automodel evaluate`` scores a sequence classifier with ``classify``'s columns, label set and
#: pad token (a classify run's saved values are its defaults).
COMMAND_RECIPE_SECTIONS: dict[str, tuple[str, ...]] = {"evaluate": ("classify",)}

#: The sections of built-in commands that are not recipes: each exists only in its command's
#: schema (``compose.command_schema``), as a recipe's own section does.
COMMAND_SECTIONS: dict[str, dict[str, dict[str, Key]]] = {
    "evaluate": {"evaluate": {
        "batch_size": _k(int, 8, "Samples per forward pass and per generated batch of `automodel evaluate` (also lm-eval's batch size).", ge=1),
        "max_samples": _k(OPT_INT, None, "Evaluate only the first N samples of the data (loss and generation; also lm-eval's limit per task); null: all.", ge=1),
        "generate": _k(bool, True, "Also generate an answer (greedy) to every prompt and report exact match and contains (prompt/completion and chat data)."),
        "max_new_tokens": _k(int, 64, "Most tokens generated per answer (generation stops earlier at EOS).", ge=1),
        "chat": _k(bool, False, "Render prompt/completion rows as a user turn and an assistant turn with the chat template (model.chat_template or the tokenizer's), as an instruct model expects; default: as finetune reads them (prompt + completion, no template). Chat data always uses the template."),
        "examples": _k(int, 3, "Example generations printed (and in --json).", ge=0),
    }},
}


Tree = dict[str, Any]  # name -> Key, or name -> Tree (a nested section or an option table)


@dataclass(frozen=True)
class OptionTable:
    """Where a registry entry's options live and who declared them (for docs and messages)."""

    path: str  # "loss.linear_ce"
    kind: str  # "loss"
    name: str  # "linear_ce"
    provider: str  # "automodel-cli 0.1.0"
    selected_by: str | None  # the config key that chooses entries of this kind ("loss.name")


class Schema:
    """Every key a command may set: a tree of sections whose leaves are ``Key``s.

    The core sections are fixed; ``compose.compose_schema`` adds a recipe's own sections and
    every registry entry's option table (``OptionTable``), so plugins extend the config the
    same way built-ins do and one validator checks it all.
    """

    def __init__(self, tree: Tree, tables: dict[str, OptionTable] | None = None,
                 recipe_sections: dict[str, str] | None = None, foreign_sections: dict[str, str] | None = None,
                 lenient: tuple[str, ...] = ()):
        self.tree = tree
        #: Sections whose unknown keys are let through (see ``compose_schema``).
        self.lenient = lenient
        self.tables = dict(tables or {})
        #: section -> the recipe that declared it (for docs).
        self.recipe_sections = dict(recipe_sections or {})
        #: sections other recipes declare -> their recipe (for "read by X only" messages).
        self.foreign_sections = dict(foreign_sections or {})
        self.keys: dict[str, Key] = dict(_leaves(tree, ""))

    def node(self, dotted: str) -> Key | Tree | None:
        node: Any = self.tree
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def lookup(self, dotted: str) -> Key | None:
        return self.keys.get(dotted)

    def spec_for(self, dotted: str) -> tuple[Key, bool] | None:
        """The Key governing ``dotted`` and whether ``dotted`` lies inside an open mapping."""
        key = self.lookup(dotted)
        if key is not None:
            return key, False
        parts = dotted.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            parent = self.lookup(".".join(parts[:cut]))
            if parent is not None and parent.open:
                return parent, True
        return None

    def sections(self) -> list[str]:
        return list(self.tree)

    def defaults(self) -> dict[str, Any]:
        """The defaults of every key outside option tables (the lowest config layer); an option
        table's defaults are filled in once its entry is chosen (``compose.complete``)."""
        tree: dict[str, Any] = {}
        for dotted, key in self.keys.items():
            if not self.table_of(dotted):
                set_dotted(tree, dotted, copy_value(key.default))
        return tree

    def table_of(self, dotted: str) -> OptionTable | None:
        """The option table ``dotted`` lies in (or is), if any."""
        for path, table in self.tables.items():
            if dotted == path or dotted.startswith(path + "."):
                return table
        return None

    def table_defaults(self, path: str) -> dict[str, Any]:
        node = self.node(path)
        return {name: copy_value(key.default) for name, key in (node or {}).items() if isinstance(key, Key)}

    def suggest(self, dotted: str) -> str | None:
        """The closest valid key (or section) to a mistyped one."""
        from automodel_cli.errors import closest

        if "." not in dotted:
            return closest(dotted, list(self.tree))
        parent = dotted.rsplit(".", 1)[0]
        siblings = [f"{parent}.{name}" for name in (self.node(parent) or {})] if isinstance(self.node(parent), dict) else []
        match = closest(dotted, siblings) or closest(dotted, list(self.keys) + list(self.tables))
        if match:
            return match
        leaf = dotted.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in self.keys}
        leaf_match = closest(leaf, by_leaf)
        return by_leaf[leaf_match] if leaf_match else None

    def markdown(self) -> str:
        """Key tables for docs/config.md: the core and recipe sections, then every option table."""
        import json

        lines: list[str] = []

        def table(title: str, items: list[tuple[str, Key]], note: str = "") -> None:
            nonlocal lines
            lines += ["", f"### {title}", ""] + ([note, ""] if note else [])
            lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
            lines += [f"| `{dotted}` | {key.type_name()}{_range_cell(key)} | `{json.dumps(key.default)}` | {key.doc} |"
                      for dotted, key in items]

        for section, body in self.tree.items():
            if isinstance(body, Key):
                table(f"`{section}`", [(section, body)])
                continue
            items = [(dotted, key) for dotted, key in _leaves(body, section) if not self.table_of(dotted)]
            recipe = self.recipe_sections.get(section)
            reader = f"`automodel {recipe}`" if recipe in COMMAND_SECTIONS else f"the `{recipe}` recipe"
            also = [f"`automodel {command}`" for command, sections in COMMAND_RECIPE_SECTIONS.items()
                    if section in sections and command != recipe]
            note = f"Read by {' and '.join([reader, *also])}" + ("." if also else " only.")
            table(f"`{section}`", items, note if recipe else "")
        for path, info in self.tables.items():
            items = list(_leaves(self.node(path) or {}, path))
            chooser = f" when `{info.selected_by}` names `{info.name}`" if info.selected_by else ""
            table(f"`{path}`", items, f"Options of the {info.kind} `{info.name}` ({info.provider}), read{chooser}.")
        return "\n".join(lines) + "\n"


def _leaves(tree: Tree, prefix: str):
    for name, node in tree.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if isinstance(node, Key):
            yield dotted, node
        else:
            yield from _leaves(node, dotted)


def option(types: type | tuple[type, ...], default: Any, doc: str, **kw: Any) -> Key:
    """A ``Key`` for a plugin's option table: ``option(int, 8, "Rank.", ge=1)``,
    ``option(str, "a", "Mode.", choices=("a", "b"))``, ``option((int, type(None)), None, ...)``."""
    return _k(types, default, doc, **kw)


def copy_value(value: Any) -> Any:
    """A deep copy of a default (mappings and lists), so no two configs share one."""
    if isinstance(value, dict):
        return {k: copy_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_value(v) for v in value]
    return value


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def get_dotted(tree: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _range_cell(key: Key) -> str:
    text = key.range_text()
    return f" ({text})" if text else ""


#: The core sections alone (what every command can check before it knows its recipe).
CORE_SCHEMA = Schema(CORE)
