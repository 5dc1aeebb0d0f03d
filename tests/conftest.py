"""Shared test helpers: run the real CLI in a subprocess or in-process."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 300) -> CliResult:
    """Run ``python -m automodel_cli ARGS`` in a fresh process, as a user would."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "automodel_cli", *args],
        capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def one_line(text: str) -> str:
    """``text`` with every run of white space one space: messages wrap, YAML aligns comments."""
    return " ".join(text.split())


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and directory under ``root``: relative path -> sha256 ("dir" for a directory).
    Equal before and after a command means it left ``root`` byte-identical (nothing changed,
    added or removed)."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def cli(capsys):
    """Run the CLI in this process (sees plugins registered with ``automodel_plugin``)."""
    from automodel_cli.cli import main

    def invoke(*args: str) -> CliResult:
        code = main(list(args))
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke
