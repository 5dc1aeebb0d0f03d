"""``automodel classify``: sequence classification and reward models, registered through the
public registry API as a third-party recipe would be, with the bundled offline demo data."""

from __future__ import annotations

from automodel_cli import hookimpl

#: What ``classify`` changes from the shared defaults: an adapter is also written merged
#: (``final/merged``), a plain classifier that ``from_pretrained`` loads alone.
CLASSIFY_DEFAULTS = {"peft": {"merge": True}}


@hookimpl
def register_recipes(registry):
    registry.add(
        "classify",
        "automodel_cli.recipes.classify:run",
        description="Sequence classification (text + label) or a Bradley-Terry reward model (chosen/rejected "
                    "pairs) on a causal-LM backbone: full or LoRA.",
        sections="automodel_cli.recipes.classify:CONFIG",
        defaults=CLASSIFY_DEFAULTS,
    )


@hookimpl
def register_datasets(registry):
    registry.add("demo-classify", "automodel_cli.components.data.classify_demo:demo_classify",
                 description="Bundled offline classification demo: name the letter group (a-c, d-g, h-j) a string "
                             "starts with (1200 train / 150 validation samples).")
