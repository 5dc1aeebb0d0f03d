"""Built-in model presets: short names for popular Hugging Face causal LMs.

A preset is a hub id plus the defaults that suit the family; the presets of each family are in
``plugins/families.py``. Any other hub id or local directory works through ``model.path``
without a preset.
"""

from __future__ import annotations

from automodel_cli import hookimpl
from automodel_cli.assets import demo_dir, demo_moe_dir, demo_vlm_dir
from automodel_cli.plugins.families import FAMILIES

#: The bundled demo: a tiny Llama-architecture model initialised at random from a bundled config
#: and trained on a bundled string-reversal task, so it runs offline on a CPU in well under a minute.
DEMO_DEFAULTS = {
    "model": {"from_scratch": True},
    "data": {"name": "demo", "eval_split": "validation", "max_length": 64},
    "train": {"global_batch_size": 32, "micro_batch_size": 32, "max_steps": 300,
              "eval_every_steps": 100},
    "optim": {"lr": 2e-3, "warmup_steps": 30, "weight_decay": 0.01},
}
#: What the demo preset sets for one recipe only: `automodel distill demo` distils the trained
#: demo model (two decoder layers, the teacher) into a student with one; `automodel benchmark
#: demo` times sequences of the demo model's max_position_embeddings; `automodel dpo demo` trains
#: the finetune demo's model on pairs of the reversal task (the correct answer against a near miss).
DEMO_RECIPE_DEFAULTS = {
    "distill": {"model": {"config": {"num_hidden_layers": 1}}},
    "benchmark": {"benchmark": {"seq_len": 128}},
    # `automodel classify demo`: the letter-group classification data (a head on the demo model).
    "classify": {"data": {"name": "demo-classify"},
                 "train": {"global_batch_size": 32, "micro_batch_size": 32, "max_steps": 150, "eval_every_steps": 50},
                 "optim": {"lr": 2e-3, "warmup_steps": 15}},
    "dpo": {"data": {"name": "demo-preference"},
            "train": {"global_batch_size": 16, "micro_batch_size": 16, "max_steps": 60, "eval_every_steps": 30,
                      "eval_batches": 4},
            "optim": {"lr": 5e-4, "warmup_steps": 5}},
}

#: The bundled vision-language demo: a tiny Gemma 3 (vision tower, projector, 2-layer decoder)
#: initialised at random from a bundled config and taught to name the colour of the shape in images
#: drawn at run time. The vision tower starts random, so it trains too (model.freeze_vision=false).
DEMO_VLM_DEFAULTS = {
    "model": {"from_scratch": True, "freeze_vision": False},
    "data": {"name": "demo-vlm", "eval_split": "validation", "max_length": 64},
    "train": {"global_batch_size": 32, "micro_batch_size": 32, "max_steps": 300,
              "eval_every_steps": 100},
    "optim": {"lr": 3e-3, "warmup_steps": 30, "weight_decay": 0.01},
}

#: The bundled mixture-of-experts demo: a tiny Qwen3-MoE (2 layers of 8 experts, top-2) from
#: random weights with the demo's tokenizer. `automodel pretrain demo-moe` trains it on the
#: pre-training demo corpus and logs the router's balance loss and the expert load;
#: `automodel finetune demo-moe` trains it on the string-reversal task like `demo`.
DEMO_MOE_DEFAULTS = {
    "model": {"from_scratch": True, "tokenizer": str(demo_dir())},
    "data": {"name": "demo", "eval_split": "validation", "max_length": 64},
    "train": {"global_batch_size": 16, "micro_batch_size": 16, "max_steps": 80,
              "eval_every_steps": 40, "eval_batches": 4},
    "optim": {"lr": 3e-3, "warmup_steps": 8, "weight_decay": 0.01},
}


@hookimpl
def register_models(registry):
    registry.add("demo", path=str(demo_dir()), family="llama", defaults=DEMO_DEFAULTS,
                 recipe_defaults=DEMO_RECIPE_DEFAULTS,
                 description="Bundled tiny Llama (random init) + string-reversal data; offline, CPU")
    registry.add("demo-moe", path=str(demo_moe_dir()), family="qwen3_moe", defaults=DEMO_MOE_DEFAULTS,
                 recipe_defaults={"benchmark": DEMO_RECIPE_DEFAULTS["benchmark"]},
                 description="Bundled tiny Qwen3-MoE (8 experts, top-2, random init) with the demo's tokenizer; "
                             "logs the router balance loss and expert load; offline, CPU")
    registry.add("demo-vlm", path=str(demo_vlm_dir()), family="gemma3", defaults=DEMO_VLM_DEFAULTS,
                 description="Bundled tiny Gemma 3 vision-language model (random init) + coloured-shape "
                             "images drawn at run time; offline, CPU")
    for family, members in FAMILIES.items():
        for name, (path, description, defaults) in members.presets.items():
            registry.add(name, path=path, family=family, description=description, defaults=defaults)
