"""An example automodel plugin: copy this package to start your own.

It adds
- the dataset ``alpaca_jsonl``: Alpaca-schema files (instruction, input, output) as prompts and
  completions;
- the loss ``label_smoothed_ce``: cross-entropy with label smoothing;
- the model preset ``tinyllama``.

Hooks receive a registry and add entries to it. Targets are ``"module:attr"`` strings so that
listing plugins stays fast: nothing heavy is imported until a run uses the entry.
"""

from automodel_cli import hookimpl


@hookimpl
def register_datasets(registry):
    registry.add(
        "alpaca_jsonl",
        "automodel_plugin_example.data:load_alpaca",
        description="Alpaca-schema JSONL (instruction, input, output) as prompt/completion.",
    )


@hookimpl
def register_losses(registry):
    registry.add(
        "label_smoothed_ce",
        "automodel_plugin_example.losses:label_smoothed_cross_entropy",
        description="Cross-entropy with 0.1 label smoothing over trained tokens.",
    )


@hookimpl
def register_models(registry):
    registry.add(
        "tinyllama",
        path="TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        family="llama",
        description="TinyLlama 1.1B Chat (from the example plugin)",
        defaults={"data": {"max_length": 1024}},
    )
