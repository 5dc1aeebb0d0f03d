"""``--nproc-per-node N``: run the recipe in N local processes through torchrun.

The parent resolves the config once and freezes it (with the output directory fixed, so every
rank agrees on it) into ``OUTPUT_DIR/launch/config.yaml``; each rank then runs
``python -m automodel_cli RECIPE FROZEN.yaml``. SIGINT/SIGTERM are forwarded to torchrun, which
passes them to the ranks so they checkpoint and stop cleanly. Secrets are redacted from the
frozen file: give tokens and API keys through environment variables.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from automodel_cli.config.yaml_io import write_text_atomic
from automodel_cli.errors import UserError

TORCHRUN_ENV = ("LOCAL_RANK", "WORLD_SIZE")
#: Where a rank writes the message of a UserError, so the launching process can show it once
#: and exit with code 2 (torchrun itself only reports "a child failed").
ERROR_FILE_ENV = "AUTOMODEL_LAUNCH_ERROR_FILE"


def inside_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_ENV)


def torchrun_command(recipe: str, frozen_config: Path, nproc_per_node: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc_per_node}", "-m", "automodel_cli", recipe, str(frozen_config)]


def freeze_config(cfg: Any, output_dir: Path) -> Path:
    cfg.tree["output_dir"] = str(output_dir)
    frozen = output_dir / "launch" / "config.yaml"
    write_text_atomic(frozen, cfg.to_yaml(with_sources=False))
    return frozen


def report_to_launcher(error: UserError) -> None:
    """Inside a launched rank: record a user error for the launching process (first one wins)."""
    path = os.environ.get(ERROR_FILE_ENV)
    if path and inside_torchrun():
        try:
            with open(path, "x", encoding="utf-8") as handle:
                handle.write(error.render())
        except OSError:
            pass


def run_torchrun(recipe: str, cfg: Any, output_dir: Path, nproc_per_node: int) -> int:
    """Start torchrun, forward stop signals to it, and return its exit code.

    A ``UserError`` in a rank is raised again here (exit code 2, one clean message)."""
    command = torchrun_command(recipe, freeze_config(cfg, output_dir), nproc_per_node)
    error_file = output_dir / "launch" / "error.txt"
    error_file.unlink(missing_ok=True)
    print(f"launching {nproc_per_node} processes: {' '.join(command)}", flush=True)
    process = subprocess.Popen(command, env={**os.environ, ERROR_FILE_ENV: str(error_file)})

    def forward(signum: int, _frame: Any) -> None:
        process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code != 0 and error_file.exists():
        raise UserError(error_file.read_text(encoding="utf-8"))
    return code
