"""Real installed plugin distributions for the plugin tests.

``pip install --target`` puts the packages and their ``*.dist-info`` (with the entry points)
into a throwaway directory; only processes started with the returned environment see them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

EXAMPLE = REPO / "examples" / "plugin_template"
BROKEN = REPO / "tests" / "fixtures" / "broken_plugin"
#: Reuses a built-in name and the example's dataset name, misnames a hook argument, and has
#: a loss that raises (tests/fixtures/rival_plugin).
RIVAL = REPO / "tests" / "fixtures" / "rival_plugin"
#: One entry of every registry kind, written from docs/plugins.md (tests/fixtures/full_plugin).
FULL = REPO / "tests" / "fixtures" / "full_plugin"


def install_plugins(target: Path, *packages: Path) -> dict[str, str]:
    """Install ``packages`` into ``target``; return the environment that puts them on the path."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), *map(str, packages)],
        check=True, capture_output=True, text=True,
    )
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}
