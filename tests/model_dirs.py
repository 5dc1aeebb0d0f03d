"""Real model directories for the model-loading tests: ``save_pretrained`` output of the bundled
demo architecture with its tokenizer files, and a small prompt/completion data file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from automodel_cli.assets import demo_dir
from automodel_cli.components.models import model_files

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def save_model(directory: Path, *, bin_state: dict | None = None) -> Path:
    """The demo architecture saved with save_pretrained plus the demo tokenizer; with
    ``bin_state``, ``pytorch_model.bin`` holding it (torch.save) instead of safetensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(demo_dir()))
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(demo_dir() / name, directory / name)
    if bin_state is not None:
        (directory / model_files.SAFE_WEIGHTS).unlink()
        torch.save(bin_state, directory / model_files.BIN_WEIGHTS)
    return directory


def remote_code_model(directory: Path) -> Path:
    """A model whose config.json maps an architecture transformers does not know to code files."""
    save_model(directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="fancy_lm", auto_map={"AutoConfig": "configuration_fancy.FancyConfig",
                                                   "AutoModelForCausalLM": "modeling_fancy.FancyForCausalLM"})
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def write_prompts(path: Path, count: int = 8) -> Path:
    """A prompt/completion JSONL file for the demo tokenizer."""
    path.write_text("".join(json.dumps({"prompt": f"reverse: ab{i}", "completion": "ba"}) + "\n" for i in range(count)))
    return path
