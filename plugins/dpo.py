"""Built-in plugin: ``automodel dpo`` (preference training) and its bundled demo data,
registered through the public registry API like any third-party plugin's."""

from __future__ import annotations

from automodel_cli import hookimpl


@hookimpl
def register_recipes(registry):
    registry.add(
        "dpo",
        "automodel_cli.recipes.dpo:run",
        description="Preference training on chosen/rejected pairs: DPO (sigmoid), IPO, hinge, SimPO, ORPO.",
        sections="automodel_cli.recipes.dpo:CONFIG",
    )


@hookimpl
def register_datasets(registry):
    registry.add(
        "demo-preference",
        "automodel_cli.components.data.preference_demo:demo_preference",
        description="Bundled offline preference demo: the reversal demo's correct answer (chosen) against a "
                    "near miss (rejected); 4000 train / 200 validation pairs.",
    )
