"""Built-in tensor-parallel plans, keyed by Hugging Face ``config.model_type`` (the table of
model families, ``plugins/families.py``, says which plan each type uses).

Targets are ``"module:attr"`` strings so that listing plans imports no torch; see
``automodel_cli.components.distributed.plans`` for what each plan shards. A third-party plugin
adds an architecture the same way::

    @hookimpl
    def register_parallel_plans(registry):
        registry.add("my_arch", "my_plugin.parallel:my_arch_plan")

where ``my_arch_plan(model, tp_mesh, sequence_parallel) -> {module FQN: ParallelStyle}``.
"""

from __future__ import annotations

from automodel_cli import hookimpl
from automodel_cli.plugins.families import FAMILIES

_PLANS = "automodel_cli.components.distributed.plans"

@hookimpl
def register_parallel_plans(registry):
    for family in FAMILIES.values():
        for model_type, (function, description) in family.plans.items():
            registry.add(model_type, f"{_PLANS}:{function}", description=description)
