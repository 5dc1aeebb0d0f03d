"""Built-in command groups that are not recipes (``automodel checkpoint ...``).

Each module defines a ``typer.Typer`` sub-app that ``automodel_cli.cli.build_app`` mounts. Like
the rest of the CLI they import torch only inside the command bodies, so ``--help`` stays fast.
"""
