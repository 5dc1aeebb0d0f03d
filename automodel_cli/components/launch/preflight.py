"""What can be known on the submitting machine is checked there, not in the queue.

A cluster job that fails on its first step because ``data.path`` was never set, or points at a
file that is not there, costs a queue wait and a node allocation to learn what this machine
knew at submission. So before a launcher prints or submits a job whose processes run elsewhere
(a cluster launcher, or the local launcher starting torchrun), ``job_problems`` collects every
such problem at once, each with where its key was set:

* the recipe has no data: finetune, distill and pretrain (and benchmark with
  ``benchmark.synthetic=false``) need ``data.path``, unless ``data.name`` names a registered
  dataset that brings its own (``demo``, ``squad``, ...);
* no model, or no teacher for distill;
* a *local* path that does not exist: ``model.path``, ``model.tokenizer``, ``data.path``,
  ``data.eval_path``, ``distill.teacher_path``, ``distill.teacher_tokenizer``. A hub id is left
  to the cluster. Paths are checked as the launcher's processes will see them
  (``Launcher.local_path``: the same path on a shared filesystem, mapped through container
  mounts, or not at all for pods), and a path named by a ``launch.setup`` line is left alone
  (setup may create it on the node);
* a GPU-sized model on a cluster launcher that would request no GPUs (``gpus_problem``).

No torch, no transformers, no network: this runs on a login node.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from automodel_cli.config.resolve import Problem
from automodel_cli.config.yaml_io import Source
from automodel_cli.errors import UserError

#: Recipes whose processes read training data.
DATA_RECIPES = ("finetune", "distill", "pretrain")
#: ``data.name`` values that read ``data.path`` and have nothing to fall back on.
PATH_DATASETS = ("auto", "instruction", "text")
MODEL_KEYS = ("model.path", "model.tokenizer")
TEACHER_KEYS = ("distill.teacher_path", "distill.teacher_tokenizer")
DATA_KEYS = ("data.path", "data.eval_path")
#: A model at least this large needs GPUs (the demo model has 0.03M parameters, the smallest
#: preset, Qwen2.5-0.5B, about 490M).
GPU_SIZED_PARAMETERS = 100_000_000
BUILTIN_RECIPES = ("finetune", "distill", "pretrain", "benchmark")


def job_problems(recipe: str, cfg: Any, spec: Any, launcher: Any,
                 plan_types: list[str] | None = None) -> list[Problem]:
    """Every problem with the job that this machine can see; [] when there is none.
    ``plan_types``: the model types with a registered tensor-parallel plan (None: not checked)."""
    from automodel_cli.components.peft.lora import qlora_problems

    problems: list[Problem] = []

    def add(dotted: str, message: str) -> None:
        problems.append(Problem(_source(cfg, dotted), dotted, message))

    if recipe in BUILTIN_RECIPES and not cfg.get("model.path"):
        add("model.path", "no model: model.path is not set. Pass a preset as TARGET (`automodel list models`) "
                          "or set model.path=HUB_ID_OR_DIR.")
    if recipe == "distill" and not cfg.get("distill.teacher_path"):
        add("distill.teacher_path", "automodel distill needs a teacher model, and distill.teacher_path is not "
                                    "set. Set it to a model directory or hub id that uses the student's tokenizer.")
    if _needs_data(recipe, cfg) and cfg.get("data.name") in PATH_DATASETS and not cfg.get("data.path"):
        add("data.path", f"no training data: data.path is not set (data.name={cfg.get('data.name')} reads "
                         "data.path). Set data.path to a local file or directory or a hub dataset id, or "
                         "data.name to a registered dataset (`automodel list datasets`).")
    for dotted in MODEL_KEYS + TEACHER_KEYS + DATA_KEYS:
        value = cfg.get(dotted)
        if not isinstance(value, str) or not value or not _is_local(dotted, value):
            continue
        if _named_by_setup(value, spec.setup):
            continue
        seen_as = launcher.local_path(spec, value)
        if seen_as is not None and not Path(seen_as).expanduser().exists():
            shown = value if seen_as == value else f"{value} (here: {seen_as})"
            add(dotted, f"`{dotted}` is the local path `{shown}`, which does not exist on this machine; the "
                        f"{launcher.name} job's processes would fail on it. Check the path (relative paths "
                        f"resolve from {os.getcwd()}), or give a hub id.")
    for dotted, message in (parallel_problems(cfg, spec, plan_types) + context_parallel_problems(recipe, cfg)
                            + pipeline_problems(recipe, cfg) + precision_problems(cfg, launcher)
                            + qlora_problems(cfg.get("peft.method"), tp=cfg.get("distributed.tp"),
                                             pp=cfg.get("distributed.pp"), cp=cfg.get("distributed.cp"))):
        add(dotted, message)
    gpus, warning = gpus_problem(cfg, spec, launcher)
    if gpus:
        add("launch.launcher", gpus)
    if warning and not problems:
        print(f"warning: {warning}", file=sys.stderr)
    return problems


def parallel_problems(cfg: Any, spec: Any, plan_types: list[str] | None) -> list[tuple[str, str]]:
    """(key, message) for tensor- and expert-parallel settings the model's config.json rules out
    (``offline_config``; none when it is not at hand: the ranks check then): no plan for the
    model type, ``distributed.tp`` not dividing the heads (or the MLP where it is sharded),
    ``distributed.ep`` on a dense model or not dividing the experts or ``dp_shard``, and LoRA
    targets on experts that expert parallelism shards."""
    from automodel_cli.components.distributed.mesh import check_ep
    from automodel_cli.components.distributed.plans import tp_divisors, tp_problems, tp_sizes
    from automodel_cli.components.peft.lora import explicit_expert_names

    tp, ep = cfg.get("distributed.tp") or 1, cfg.get("distributed.ep") or 1
    if tp <= 1 and ep <= 1:
        return []
    config = offline_config(cfg)
    if config is None:
        return []
    model_type = config.get("model_type", "?")
    found: list[tuple[str, str]] = []
    if tp > 1 and plan_types is not None and model_type not in plan_types:
        found.append(("distributed.tp", f"distributed.tp={tp} needs a tensor-parallel plan, and none is registered "
                                        f"for model type `{model_type}` (plans exist for: {', '.join(plan_types)}). "
                                        "Use distributed.tp=1 (FSDP works for every model) or install a plugin "
                                        "that registers one."))
    problems = tp_problems(config, tp) if tp > 1 else []
    if problems:
        sizes = ", ".join(f"{k}={v}" for k, v in tp_sizes(config).items())
        found.append(("distributed.tp", f"distributed.tp={tp} must divide the model's {', '.join(problems)} "
                                        f"({model_type}: {sizes}). Choose tp from {tp_divisors(config)}."))
    if ep > 1:
        dp_shard = getattr(getattr(spec, "mesh", None), "dp_shard", None)
        try:
            experts = check_ep(config, ep, where=str(cfg.get("model.path")))
        except UserError as problem:
            experts = None
            found.append(("distributed.ep", problem.render()))
        if isinstance(dp_shard, int) and dp_shard % ep:
            found.append(("distributed.ep", f"distributed.ep={ep} must divide distributed.dp_shard={dp_shard} "
                                            "(expert-parallel groups are carved out of the FSDP shard group)."))
        if experts and cfg.get("peft.method") not in (None, "none"):
            named = explicit_expert_names(cfg.get("peft.target_modules") or "all-linear")
            if cfg.get("peft.moe_experts") is True or named:
                what = f"peft.target_modules names {', '.join(named)}" if named else "peft.moe_experts=true"
                found.append(("peft.moe_experts" if not named else "peft.target_modules",
                              f"{what}, but distributed.ep={ep} shards the experts, where LoRA cannot adapt "
                              "them. Leave the experts out (all-linear does with ep > 1) or set distributed.ep=1."))
    return found


def pipeline_problems(recipe: str, cfg: Any) -> list[tuple[str, str]]:
    """(key, message) for ``distributed.pp > 1`` where it cannot run: a recipe without a
    pipelined step, settings that contradict each other (``training/pipeline.check``), a
    vision-language or mixture-of-experts model, and fewer decoder layers than stages or split
    points that do not cut them (from config.json, when at hand)."""
    from automodel_cli.components.distributed.pipeline import split_points
    from automodel_cli.components.models.structure import num_experts
    from automodel_cli.training.pipeline import check, virtual_stages

    pp = cfg.get("distributed.pp") or 1
    try:
        check(recipe, cfg)
    except UserError as problem:
        key = next((k for k in ("pp_virtual_stages", "pp_split") if f"distributed.{k}" in problem.message), "pp")
        return [(f"distributed.{key}", problem.render())]
    if not isinstance(pp, int) or pp <= 1:
        return []
    config = offline_config(cfg)
    if config is None:
        return []
    found: list[tuple[str, str]] = []
    model_type = config.get("model_type", "?")
    if config.get("vision_config") is not None:
        found.append(("distributed.pp", f"distributed.pp={pp} does not run vision-language models ({model_type}). "
                                        "Set distributed.pp=1."))
    text = config.get("text_config") or config
    if num_experts(text):
        found.append(("distributed.pp", f"distributed.pp={pp} does not run mixture-of-experts models ({model_type}): "
                                        "the router balance loss needs every layer on one rank. Set distributed.pp=1 "
                                        "(distributed.ep splits the experts)."))
    layers = text.get("num_hidden_layers")
    if isinstance(layers, int):
        stages = pp * virtual_stages(cfg)
        try:
            split_points(layers, stages, manual=cfg.get("distributed.pp_split"))
        except UserError as problem:
            key = "distributed.pp_split" if cfg.get("distributed.pp_split") is not None else "distributed.pp"
            found.append((key, f"distributed.pp={pp} x {stages // pp} stage(s) per rank = {stages} stages for "
                               f"{model_type} ({layers} decoder layers): {problem.render()}"))
    return found


def context_parallel_problems(recipe: str, cfg: Any, cp: int | None = None) -> list[tuple[str, str]]:
    """(key, message) for ``distributed.cp > 1`` where it cannot run: a recipe whose step does not
    split sequences, a vision-language model or image-text data, a model with sliding-window
    attention or logit soft-capping (from config.json, when at hand), and sequences that do not
    cut into ``2 * cp`` chunks: ``data.max_length`` (pretrain blocks, packed rows) not a multiple
    of what batches are padded to. Whether cp fits the world size is ``job_mesh``'s check.
    ``cp``: the degree to check (default ``distributed.cp``; the automatic layout asks about 2)."""
    from automodel_cli.components.distributed.context_parallel import unsupported_problem
    from automodel_cli.training.context_parallel import CP_RECIPES, pad_multiple

    cp = cp or cfg.get("distributed.cp") or 1
    if not isinstance(cp, int) or cp <= 1:
        return []
    found: list[tuple[str, str]] = []
    if recipe not in CP_RECIPES:
        found.append(("distributed.cp", f"distributed.cp={cp} (context parallelism) is supported by "
                                        f"{' and '.join(CP_RECIPES)}, not by `automodel {recipe}`. Set distributed.cp=1."))
        return found
    if cfg.get("data.name") == "vlm":
        found.append(("distributed.cp", f"distributed.cp={cp} cannot split image-text batches (data.name=vlm): image "
                                        "tokens cannot be cut by position. Set distributed.cp=1."))
    config = offline_config(cfg)
    if config is not None:
        if config.get("vision_config") is not None:
            found.append(("distributed.cp", f"distributed.cp={cp} does not run vision-language models "
                                            f"({config.get('model_type', '?')}). Set distributed.cp=1."))
        problem = unsupported_problem(config.get("text_config") or config)
        if problem:
            found.append(("distributed.cp", f"{problem} Set distributed.cp=1 for this model."))
    tp = cfg.get("distributed.tp") or 1
    multiple = pad_multiple(cp, tp, bool(cfg.get("distributed.sequence_parallel")) and tp > 1)
    length = cfg.get("data.max_length")
    cut = recipe == "pretrain" or cfg.get("data.packing")
    if cut and isinstance(length, int) and multiple and length % multiple:
        what = "pretrain blocks" if recipe == "pretrain" else "packed rows (data.packing=true)"
        found.append(("data.max_length", f"distributed.cp={cp} cuts every sequence into {2 * cp} equal chunks, but "
                                         f"data.max_length={length} ({what}) is not a multiple of {multiple}. Set "
                                         f"data.max_length to a multiple of {multiple} (e.g. "
                                         f"{-(-length // multiple) * multiple})."))
    return found


def precision_problems(cfg: Any, launcher: Any) -> list[tuple[str, str]]:
    """(key, message) when ``train.precision=fp8`` cannot run: with tensor parallelism; on a
    cluster job that requests no GPUs; on this machine (the local launcher's processes) without
    a CUDA GPU of compute capability 8.9+ or without torchao. A cluster's GPUs and packages are
    checked by its processes (``components/training/float8.check``)."""
    from automodel_cli.components.training import float8

    if cfg.get("train.precision") != "fp8":
        return []
    found = []
    tp_problem = float8.tensor_parallel_problem(cfg.get("distributed.tp") or 1)
    if tp_problem:
        found.append(("distributed.tp", f"{tp_problem} {float8.TP_HINT}"))
    if launcher.requests_gpus:
        if not cfg.get("launch.gpus_per_node"):
            found.append(("train.precision", f"{float8.REQUIREMENT}, and the {launcher.name} job requests no GPUs. "
                                             "Pass --gpus-per-node N, "
                                             f"or set train.precision=auto."))
        return found
    problem = float8.device_problem(_local_device())
    if problem:
        found.append(("train.precision", f"{problem} {float8.REQUIREMENT_HINT}"))
    return found


def _local_device() -> Any:
    """The device the local launcher's processes train on (the first GPU, else the CPU)."""
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def gpus_problem(cfg: Any, spec: Any, launcher: Any) -> tuple[str | None, str | None]:
    """(problem, warning): a cluster launcher without ``--gpus-per-node`` requests no GPUs, which
    is refused for a GPU-sized model and worth a warning for a small one. ``--gpus-per-node 0``
    says "CPUs on purpose" and silences both."""
    if not launcher.requests_gpus or cfg.get("launch.gpus_per_node") is not None:
        return None, None
    size = estimated_parameters(cfg)
    what = (f"the model {cfg.get('model.path')}" + (f" ({size / 1e6:,.0f}M parameters)" if size else ""))
    if size is None or size >= GPU_SIZED_PARAMETERS:
        known = "" if size else " (its size is not known here, so it is taken to be GPU-sized)"
        return (f"--gpus-per-node is not set, so the {launcher.name} job would request no GPUs and train "
                f"{what}{known} on CPUs, {spec.nproc_per_node} process(es) per node. Pass --gpus-per-node N "
                f"(launch.gpus_per_node: GPUs requested per node, one process each), or --gpus-per-node 0 to "
                f"run on CPUs on purpose."), None
    return None, (f"--gpus-per-node is not set: the {launcher.name} job requests no GPUs and runs "
                  f"{spec.nproc_per_node} CPU process(es) per node (pass --gpus-per-node N for GPUs, "
                  f"--gpus-per-node 0 to silence this).")


def estimated_parameters(cfg: Any) -> int | None:
    """Parameters of the configured model from its config.json (``offline_config``); None when
    no config is at hand."""
    from automodel_cli.components.training.memory_plan import Architecture

    config = offline_config(cfg)
    architecture = Architecture.from_config(config) if config is not None else None
    return architecture.parameters().total if architecture is not None else None


def offline_config(cfg: Any, path_key: str = "model.path", overrides_key: str | None = "model.config") -> dict[str, Any] | None:
    """The config.json of the model ``path_key`` names, read without network: a local file or
    model directory, the bundled copy of a preset's, or a copy in the Hugging Face cache; with
    ``overrides_key``'s overrides applied. None when none is at hand."""
    from automodel_cli.assets import bundled_config

    path = cfg.get(path_key)
    if not path:
        return None
    local = Path(path).expanduser()
    candidates = (local, local / "config.json", bundled_config(path))
    file = next((c for c in candidates if c is not None and c.is_file() and c.suffix == ".json"), None)
    file = file or _cached_hub_config(path)
    if file is None:
        return None
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    overrides = (cfg.get(overrides_key) if overrides_key else None) or {}
    overrides = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides)
    return {**config, **overrides}


def _cached_hub_config(path: str) -> Path | None:
    """A hub model's config.json from the local Hugging Face cache, if it was downloaded before."""
    if path.count("/") != 1 or Path(path).expanduser().exists():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return None
    try:
        found = try_to_load_from_cache(path, "config.json")
    except Exception:  # noqa: BLE001 - an unusual id is simply not cached
        return None
    return Path(found) if isinstance(found, str) else None


# ---------------------------------------------------------------------------- helpers
def _needs_data(recipe: str, cfg: Any) -> bool:
    return recipe in DATA_RECIPES or (recipe == "benchmark" and cfg.get("benchmark.synthetic") is False)


def _is_local(dotted: str, value: str) -> bool:
    """Whether the recipe would read ``value`` as a local path (the loaders' own rules)."""
    if dotted in DATA_KEYS:
        from automodel_cli.components.data.loading import _looks_local

        return Path(value).expanduser().exists() or _looks_local(value)
    from automodel_cli.components.models.loading import looks_like_local_path

    return looks_like_local_path(value)


def _named_by_setup(path: str, setup: list[str]) -> bool:
    """A ``launch.setup`` line names the path or the directory holding it (setup may create it
    on the node, e.g. by unpacking data to local disk). Only whole paths count: a setup line
    that merely mentions ``/shared`` does not excuse ``/shared/data/train.jsonl``."""
    candidates = {path}
    for form in (Path(path), Path(os.path.abspath(os.path.expanduser(path)))):
        candidates.add(str(form))
        if len([part for part in form.parent.parts if part != form.anchor]) >= 2:  # not `/tmp`, `data`
            candidates.add(str(form.parent))
    patterns = [re.compile(r"(?<![\w./~-])" + re.escape(c.rstrip("/")) + r"(?![\w.-])") for c in candidates]
    return any(pattern.search(line) for pattern in patterns for line in setup)


def _source(cfg: Any, dotted: str) -> Source:
    return cfg.source_of(dotted) or Source("defaults")
