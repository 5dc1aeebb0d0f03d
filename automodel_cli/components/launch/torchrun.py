"""Run the recipe in N local processes through torchrun (the local launcher's multi-process case).

The parent resolves the config once and freezes it (with the output directory fixed, so every
rank agrees on it) into ``OUTPUT_DIR/launch/config.yaml``; each rank then runs
``python -m automodel_cli RECIPE FROZEN.yaml``. SIGINT/SIGTERM are forwarded to torchrun, which
passes them to the ranks so they checkpoint and stop cleanly. A credential in the config is
refused before anything is frozen (launch/secrets.py): the ranks inherit this shell's
environment, so export tokens and API keys there.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from typing import Any

from automodel_cli.errors import UserError
from automodel_cli.runtime import inside_torchrun

#: Where a rank writes the message of a UserError, so the launching process (or
#: ``automodel launch status``) can show it once (torchrun itself only reports "a child failed").
ERROR_FILE_ENV = "AUTOMODEL_LAUNCH_ERROR_FILE"


def report_to_launcher(error: UserError) -> None:
    """Inside a launched rank: record a user error for the launching process (first one wins)."""
    path = os.environ.get(ERROR_FILE_ENV)
    if path and inside_torchrun():
        try:
            with open(path, "x", encoding="utf-8") as handle:
                handle.write(error.render())
        except OSError:
            pass


def run_torchrun(spec: Any) -> int:
    """Start torchrun on this machine, forward stop signals to it, and return its exit code.

    A ``UserError`` in a rank is raised again here (exit code 2, one clean message)."""
    from automodel_cli.components.launch.base import ERROR_FILE, default_python

    frozen = spec.freeze()
    command = spec.torchrun_command(python=default_python(), config_path=str(frozen),
                                    rdzv_host="localhost", rdzv_id="local")
    error_file = spec.launch_dir / ERROR_FILE
    error_file.unlink(missing_ok=True)
    # stderr: stdout belongs to the recipe (``automodel benchmark --json`` prints one object).
    print(f"launching {spec.nproc_per_node} processes: {shlex.join(command)}", file=sys.stderr, flush=True)
    process = subprocess.Popen(command, env={**os.environ, ERROR_FILE_ENV: str(error_file)})

    stopped_by: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        stopped_by.append(signum)
        process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code != 0 and error_file.exists():
        raise UserError(error_file.read_text(encoding="utf-8"))
    if code != 0 and stopped_by:
        return 128 + stopped_by[0]  # torchrun reports ranks that stopped on request as failed
    return code
