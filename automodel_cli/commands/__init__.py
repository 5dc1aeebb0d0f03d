"""The CLI's command code: command groups that are not recipes (``automodel checkpoint ...``)
and what the recipe commands share (``run.py``).

Each group module defines a ``typer.Typer`` sub-app that ``automodel_cli.cli.build_app`` mounts;
``run.py`` holds the run options, flag layer and command factory of the recipe commands, which
``automodel launch FILE`` reuses. Like the rest of the CLI they import torch only inside the
command bodies, so ``--help`` stays fast.
"""
