"""Allow ``python -m automodel_cli`` (used by torchrun and launchers)."""

from automodel_cli.cli import main

if __name__ == "__main__":
    main()
