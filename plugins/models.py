"""Built-in model presets: short names for popular Hugging Face causal LMs.

A preset is a hub id plus the defaults that suit the family. Any other hub id or local
directory works through ``model.path`` without a preset.
"""

from __future__ import annotations

from automodel_cli import hookimpl
from automodel_cli.assets import demo_dir

#: The bundled demo: a tiny Llama-architecture model initialised at random from a bundled config
#: and trained on a bundled string-reversal task, so it runs offline on a CPU in well under a minute.
DEMO_DEFAULTS = {
    "model": {"from_scratch": True},
    "data": {"name": "demo", "eval_split": "validation", "max_length": 64},
    "train": {"global_batch_size": 32, "micro_batch_size": 32, "max_steps": 300,
              "eval_every_steps": 100},
    "optim": {"lr": 3e-3, "warmup_steps": 30, "weight_decay": 0.01},
}
#: What the demo preset sets for one recipe only: `automodel distill demo` distils the trained
#: demo model (two decoder layers, the teacher) into a student with one; `automodel benchmark
#: demo` times sequences of the demo model's max_position_embeddings.
DEMO_RECIPE_DEFAULTS = {
    "distill": {"model": {"config": {"num_hidden_layers": 1}}},
    "benchmark": {"benchmark": {"seq_len": 128}},
}

# name -> (hub id, family, description, defaults)
PRESETS: dict[str, tuple[str, str, str, dict]] = {
    "llama3": ("meta-llama/Llama-3.2-1B-Instruct", "llama", "Llama 3.2 1B Instruct (alias of llama3.2-1b)", {}),
    "llama3.2-1b": ("meta-llama/Llama-3.2-1B-Instruct", "llama", "Llama 3.2 1B Instruct", {}),
    "llama3.2-3b": ("meta-llama/Llama-3.2-3B-Instruct", "llama", "Llama 3.2 3B Instruct", {}),
    "llama3.1-8b": ("meta-llama/Llama-3.1-8B-Instruct", "llama", "Llama 3.1 8B Instruct", {}),
    "qwen2.5": ("Qwen/Qwen2.5-0.5B-Instruct", "qwen2", "Qwen2.5 0.5B Instruct (alias of qwen2.5-0.5b)", {}),
    "qwen2.5-0.5b": ("Qwen/Qwen2.5-0.5B-Instruct", "qwen2", "Qwen2.5 0.5B Instruct", {}),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B-Instruct", "qwen2", "Qwen2.5 7B Instruct", {}),
    "qwen3": ("Qwen/Qwen3-0.6B", "qwen3", "Qwen3 0.6B (alias of qwen3-0.6b)", {}),
    "qwen3-0.6b": ("Qwen/Qwen3-0.6B", "qwen3", "Qwen3 0.6B", {}),
    "qwen3-8b": ("Qwen/Qwen3-8B", "qwen3", "Qwen3 8B", {}),
    "mistral": ("mistralai/Mistral-7B-Instruct-v0.3", "mistral", "Mistral 7B Instruct v0.3", {}),
    # Gemma 2 uses attention logit soft-capping, which only the eager kernel implements exactly.
    "gemma2": ("google/gemma-2-2b-it", "gemma2", "Gemma 2 2B IT",
               {"model": {"attn_implementation": "eager"}}),
    "gemma3": ("google/gemma-3-1b-it", "gemma3", "Gemma 3 1B IT (text)", {}),
    "phi3": ("microsoft/Phi-3-mini-4k-instruct", "phi3", "Phi-3 mini 4k Instruct", {"data": {"max_length": 4096}}),
    "phi4": ("microsoft/Phi-4-mini-instruct", "phi3", "Phi-4 mini Instruct", {}),
}


@hookimpl
def register_models(registry):
    registry.add("demo", path=str(demo_dir()), family="llama", defaults=DEMO_DEFAULTS,
                 recipe_defaults=DEMO_RECIPE_DEFAULTS,
                 description="Bundled tiny Llama (random init) + string-reversal data; offline, CPU")
    for name, (path, family, description, defaults) in PRESETS.items():
        registry.add(name, path=path, family=family, description=description, defaults=defaults)
