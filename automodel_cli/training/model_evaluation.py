"""``automodel evaluate``: what is evaluated, its config, and the evaluation itself.

What is evaluated (``resolve_target``) is one of

- a run directory: its ``final/`` (a model, or an adapter on the base the run recorded), with
  the run's saved config supplying the defaults (data, columns, chat template, max length, seed:
  so the validation split is the run's own; a ``dpo`` run's pairs are scored on their chosen
  responses);
- a Hugging Face model directory or hub id;
- a peft adapter directory, on the base its ``adapter_config.json`` records (``--base`` overrides).

The config (``evaluation_config``) is composed like any command's: defaults < the run's saved
settings < the target < ``key=value`` overrides, with the command's own section ``evaluate.*``.

``evaluate_model`` then reports, on one process (CUDA when available, bf16 there):

- validation loss, token accuracy and teacher-forced exact match over the trained tokens, as
  finetune's validation computes them (``components/training/evaluation.py``; the SFT data
  pipeline: prompt/completion and chat rows count the completion, plain text every token), and
  perplexity = exp(loss);
- generated answers' exact match and contains (``components/training/generation.py``);
- lm-evaluation-harness tasks on the loaded model (``components/training/lm_eval_bridge.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from automodel_cli.errors import UserError
from automodel_cli.run_layout import RunDir

COMMAND = "evaluate"
#: What a run's saved config lends the evaluation (the rest is the run's own business).
RUN_KEYS = ("model.chat_template", "model.trust_remote_code", "model.attn_implementation", "model.revision",
            "train.seed")
RUN_SECTIONS = ("data", "classify")  # classify: a classifier's columns, pad token
#: Where the run's data came from: dropped when the command line names other data.
DATA_SOURCE_KEYS = ("name", "path", "split", "eval_path", "eval_split", "eval_size", "options")
WHAT_HINT = ("Pass a run directory (with final/), a Hugging Face model directory (config.json + weights), a peft "
             "adapter directory (adapter_config.json) or a hub model id.")


@dataclass
class EvaluationTarget:
    """What ``RUN_OR_MODEL`` named: ``kind`` run, model or adapter; ``model_path`` the model (or
    the adapter's base) as ``model.path``; ``adapter`` the adapter directory; ``run`` the run."""

    kind: str
    model_path: str
    tokenizer: str
    adapter: Path | None = None
    run: Path | None = None

    def describe(self) -> str:
        what = f"adapter {self.adapter} on {self.model_path}" if self.adapter else self.model_path
        return f"run {self.run}: {what}" if self.run else what


def resolve_target(text: str, base: str | None = None) -> EvaluationTarget:
    """What ``text`` names (see the module docstring); ``UserError`` for anything else."""
    from automodel_cli.components.models.adapters import is_adapter_dir
    from automodel_cli.components.models.loading import looks_like_local_path

    path = Path(text).expanduser()
    if not path.exists():
        if looks_like_local_path(text):
            raise UserError(f"{text} does not exist.", WHAT_HINT)
        if base is not None:
            raise UserError(f"--base is for an adapter directory, and {text} is a hub model id.",
                            "Leave out --base, or pass the adapter directory.")
        return EvaluationTarget("model", text, text)  # a hub id: loaded through the hub checks
    if not path.is_dir():
        raise UserError(f"{text} is a file, not a directory.", WHAT_HINT)
    path = path.resolve()
    run = RunDir(path)
    if not (path / "config.json").is_file() and not is_adapter_dir(path) and run.holds_run():
        if not run.final.is_dir():
            raise UserError(
                f"Run directory {path} has no final/ model: the run has not finished.",
                "Finish it (resume with checkpoint.resume=auto), or write a checkpoint as a model with "
                f"`automodel checkpoint consolidate {path} --out DIR` and evaluate DIR.")
        inner = resolve_target(str(run.final), base)
        return EvaluationTarget(inner.kind, inner.model_path, inner.tokenizer, inner.adapter, run=path)
    if is_adapter_dir(path):
        from automodel_cli.components.models.adapters import read_adapter_config, resolve_adapter_base

        adapter_config = read_adapter_config(path)
        if adapter_config.get("task_type") == "SEQ_CLS":  # a classifier's adapter: its base is a causal LM
            merged = path / "merged"
            if (merged / "config.json").is_file() and base is None:
                return resolve_target(str(merged))
            raise UserError(f"{path} is a sequence-classification adapter without its merged model (merged/).",
                            "Evaluate the classifier `automodel classify` writes next to its adapter (RUN/final/merged), "
                            "or merge it with `automodel convert merge-lora` first.")
        base_path = resolve_adapter_base(path, adapter_config, base)
        return EvaluationTarget("adapter", base_path, str(path) if _has_tokenizer(path) else base_path, adapter=path)
    if base is not None:
        raise UserError(f"--base is for an adapter directory, and {path} is not one (no adapter_config.json).",
                        "Leave out --base, or pass the adapter directory.")
    if (path / "config.json").is_file():
        return EvaluationTarget("model", str(path), str(path))
    raise UserError(f"{path} is neither a run directory, a model directory nor a peft adapter directory.", WHAT_HINT)


def _has_tokenizer(directory: Path) -> bool:
    from automodel_cli.components.checkpoint.consolidate import TOKENIZER_FILES

    return any((directory / name).is_file() for name in TOKENIZER_FILES)


# ---------------------------------------------------------------------------------- config
def evaluation_config(registries: Any, target: EvaluationTarget, overrides: list[str]) -> Any:
    """The resolved config of ``automodel evaluate``: defaults < the run's saved settings (its
    data, unless the command line names other data: then only its columns and max length) <
    the target's model and tokenizer < ``overrides``."""
    from automodel_cli.config.assemble import check_registry_names
    from automodel_cli.config.compose import command_schema, complete
    from automodel_cli.config.resolve import Layer, defaults_layer, layer_from_overrides, resolve

    schema = command_schema(registries, COMMAND)
    command_line = layer_from_overrides(overrides, schema)
    layers = [defaults_layer(schema)]
    if target.run is not None and RunDir(target.run).config.is_file():
        named = command_line.data.get("data") or {}
        layers.append(_run_layer(RunDir(target.run).config, own_data="path" in named or "name" in named))
    layers.append(Layer(label=f"the evaluated {target.kind}",
                        data={"model": {"path": target.model_path, "tokenizer": target.tokenizer}}))
    layers.append(command_line)
    resolved = resolve(layers, schema)
    check_registry_names(resolved, registries)
    complete(resolved)
    resolved.tree["recipe"] = None
    return resolved


def _run_layer(config_path: Path, own_data: bool) -> Any:
    """The settings of a run's saved config that describe its data and how it was read."""
    from automodel_cli.config.resolve import Layer
    from automodel_cli.config.schema import get_dotted, set_dotted
    from automodel_cli.config.yaml_io import load_yaml_file

    saved, lines = load_yaml_file(str(config_path))
    data: dict[str, Any] = {}
    for dotted in RUN_KEYS:
        if (value := get_dotted(saved, dotted)) is not None:
            set_dotted(data, dotted, value)
    for section in RUN_SECTIONS:
        for key, value in (saved.get(section) or {}).items():
            if not (own_data and key in DATA_SOURCE_KEYS):
                set_dotted(data, f"{section}.{key}", value)
    if saved.get("recipe") == "dpo" and not own_data:  # preference pairs: the chosen response is the answer
        set_dotted(data, "data.completion_column", get_dotted(saved, "dpo.chosen_column") or "chosen")
    return Layer(label=f"run config {config_path}", data=data, file=str(config_path), lines=lines)


# ------------------------------------------------------------------------------ evaluation
@dataclass
class EvaluationReport:
    """What ``evaluate_model`` found: metrics, per-task lm-eval metrics, settings, examples."""

    metrics: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "tasks": self.tasks, "settings": self.settings,
                "examples": self.examples, "notes": self.notes}


def has_data(cfg: Any) -> bool:
    return bool(cfg.data.path) or cfg.data.name != "auto"


def evaluate_model(cfg: Any, target: EvaluationTarget, registries: Any, say: Callable[[str], None], *,
                   tasks: list[str] | None = None, include_path: str | None = None) -> EvaluationReport:
    """Load ``target`` once and run every evaluation asked for (see the module docstring)."""
    import torch

    from automodel_cli.components.models.loading import load_config, load_tokenizer, torch_dtype
    from automodel_cli.components.models.vlm import is_vision_language
    from automodel_cli.components.models.heads import declares_sequence_classifier
    from automodel_cli.training.classifier_evaluation import classifier_metrics

    settings = dict(cfg.tree[COMMAND])
    model_config = load_config(cfg.model)
    classifier = declares_sequence_classifier(model_config)
    if not has_data(cfg) and not tasks:
        what = ("text/label rows, or chosen/rejected pairs for a reward model" if classifier
                else "prompt/completion, messages or text columns")
        raise UserError(f"Nothing to evaluate {target.describe()} on: no data and no --tasks.",
                        f"Set data.path=FILE (jsonl/json/parquet/csv with {what}), or pass --tasks NAME,... "
                        "(lm-evaluation-harness tasks, for a language model).")
    if classifier and tasks:
        raise UserError(f"--tasks runs lm-evaluation-harness tasks on a language model; {cfg.model.path} is a "
                        "sequence classifier (it has no language-model head).",
                        "Leave out --tasks: a classifier is scored on data.path (accuracy, F1, pairwise accuracy).")
    task_manager = None
    if tasks:  # unknown tasks fail before anything loads
        from automodel_cli.components.training import lm_eval_bridge

        task_manager = lm_eval_bridge.task_manager(include_path)
        lm_eval_bridge.check_tasks(task_manager, tasks, include_path)
    if is_vision_language(model_config):
        raise UserError(f"`automodel evaluate` evaluates causal language models; {cfg.model.path} is a "
                        "vision-language model.", "Evaluate a text-only model.")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch_dtype(cfg.model.dtype, device.type)
    tokenizer = load_tokenizer(cfg.model)
    samples, mode = (_eval_samples(cfg, tokenizer, registries, say) if has_data(cfg) and not classifier
                     else ([], None))
    model = _load(cfg, target, dtype).to(device).eval()
    say(f"model: {target.describe()} ({device.type}, {str(dtype).removeprefix('torch.')})")
    report = EvaluationReport(settings={**settings, "model": target.model_path, "kind": target.kind,
                                        "adapter": str(target.adapter) if target.adapter else None,
                                        "run": str(target.run) if target.run else None,
                                        "data": cfg.data.path or cfg.data.name, "max_length": cfg.data.max_length,
                                        "device": device.type, "dtype": str(dtype).removeprefix("torch.")})
    if classifier:
        report.metrics.update(classifier_metrics(cfg, model, tokenizer, registries, say, device))
    if samples:
        report.metrics.update(_loss(cfg, model, samples, tokenizer, device))
        if settings["generate"] and mode != "text":
            _generation(cfg, model, tokenizer, samples, device, report)
        elif settings["generate"]:
            report.notes.append("plain text data has no prompts: no answers generated")
    if tasks:
        from automodel_cli.components.training import lm_eval_bridge

        report.tasks = lm_eval_bridge.run_tasks(model, tokenizer, tasks, task_manager,
                                                batch_size=settings["batch_size"], limit=settings["max_samples"])
    return report


def _load(cfg: Any, target: EvaluationTarget, dtype: Any) -> Any:
    from automodel_cli.components.models.loading import load_model

    model = load_model(cfg.model, seed=cfg.train.seed, dtype=dtype)
    if target.adapter is None:
        return model
    from automodel_cli.components.models.adapters import load_adapted

    return load_adapted(model, target.adapter)


def _eval_samples(cfg: Any, tokenizer: Any, registries: Any, say: Callable[[str], None]) -> tuple[list[dict], str]:
    from automodel_cli.training.sft_data import prepare_eval_samples

    return prepare_eval_samples(cfg, tokenizer, registries, say, limit=cfg.get("evaluate.max_samples"),
                                as_chat=cfg.get("evaluate.chat"))


def _loss(cfg: Any, model: Any, samples: list[dict], tokenizer: Any, device: Any) -> dict[str, Any]:
    """Loss, perplexity, token accuracy and teacher-forced exact match over ``samples``."""
    from automodel_cli.components.training.evaluation import evaluate
    from automodel_cli.training.sft_data import eval_only_data, model_inputs

    data = eval_only_data(samples, cfg, tokenizer.pad_token_id)
    result = evaluate(model, data.eval_batches(cfg.get("evaluate.batch_size"), None),
                      lambda model_, batch: model_(**model_inputs(batch, device), use_cache=False).logits)
    loss = result["eval_loss"]
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "token_accuracy": result["eval_token_accuracy"], "teacher_forced_exact_match": result["eval_exact_match"],
            "samples": result["eval_samples"]}


def _generation(cfg: Any, model: Any, tokenizer: Any, samples: list[dict], device: Any,
                report: EvaluationReport) -> None:
    from automodel_cli.components.training.generation import answer_samples, generate_answers

    answers = answer_samples(samples, tokenizer)
    result = generate_answers(model, tokenizer, answers, batch_size=cfg.get("evaluate.batch_size"),
                              max_new_tokens=cfg.get("evaluate.max_new_tokens"), device=device)
    report.metrics.update(result.metrics(prefix="generate_"))
    report.examples = result.examples(cfg.get("evaluate.examples"))
