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


def save_sharded_model(directory: Path, *, shards: int = 3, seed: int = 0, **config: object) -> Path:
    """The demo architecture with ``config`` overrides (layer sizes), initialised at random and
    saved by save_pretrained as about ``shards`` safetensors files with ``model.safetensors.index.json``,
    plus the demo tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(demo_dir(), **config))
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    model.save_pretrained(directory, max_shard_size=int(total / shards * 1.15))  # whole layers per file
    del model
    for name in TOKENIZER_FILES:
        shutil.copy(demo_dir() / name, directory / name)
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


def answering_model(directory: Path) -> Path:
    """The demo architecture with random weights large enough that greedy decoding gives each
    prompt its own answer (some end at EOS): a model whose generations tell prompts apart."""
    return save_sharded_model(directory, shards=1, initializer_range=0.3)


def write_own_answers(path: Path, model_dir: Path, *, count: int, max_new_tokens: int) -> list[str]:
    """A prompt/completion JSONL file of ``count`` prompts of different lengths for the model in
    ``model_dir``: the even rows' completions are the model's own greedy answer, decoded one
    prompt at a time (``generate`` without batching or padding) up to EOS, the odd rows'
    ``zzzz``. Returns the hand-decoded answers, in order."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows, answers = [], []
    for i in range(count):
        prompt = "reverse: " + "abcdefghij"[: 2 + (i * 7) % 9] + "\n"
        ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        if tokenizer.eos_token_id in out:
            out = out[:out.index(tokenizer.eos_token_id)]
        answer = tokenizer.decode(out, skip_special_tokens=True).strip()
        answers.append(answer)
        rows.append({"prompt": prompt, "completion": answer if i % 2 == 0 else "zzzz"})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return answers


#: Custom modelling code that reads a weight while the model is constructed: it cannot be built
#: on the meta device (``model.meta_init=false`` loads it whole instead).
READS_WEIGHTS_AT_INIT = {
    "configuration_fancy.py": (
        "from transformers import LlamaConfig\n\n\n"
        "class FancyConfig(LlamaConfig):\n    model_type = 'fancy_lm'\n"),
    "modeling_fancy.py": (
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_fancy import FancyConfig\n\n\n"
        "class FancyForCausalLM(LlamaForCausalLM):\n    config_class = FancyConfig\n\n"
        "    def __init__(self, config):\n        super().__init__(config)\n"
        "        self.head_scale = float(self.lm_head.weight.detach().abs().mean())\n"),
}


def weight_reading_model(directory: Path) -> Path:
    """A custom-code model (``trust_remote_code``) whose construction reads a weight's value."""
    remote_code_model(directory)
    for name, code in READS_WEIGHTS_AT_INIT.items():
        (directory / name).write_text(code)
    return directory


def reshape_tensor(directory: Path, key: str, shape: tuple[int, ...]) -> None:
    """Rewrite the single-file checkpoint of ``directory`` with ``key`` of another shape."""
    from safetensors.torch import load_file, save_file

    path = directory / model_files.SAFE_WEIGHTS
    state = load_file(path)
    state[key] = torch.zeros(shape)
    save_file(state, path, metadata={"format": "pt"})

