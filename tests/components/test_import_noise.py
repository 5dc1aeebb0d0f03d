"""Optional extras that peft imports (torchao, bitsandbytes) print nothing about themselves in a
run: the CLI drops exactly their import-time messages, nothing else."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys

import pytest

NOISY_IMPORT = """
from automodel_cli.components.torchao_import import quiet_torchao_import_noise
quiet_torchao_import_noise()
import {module}
import logging
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("a real bitsandbytes warning")
"""


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_bitsandbytes_import_is_quiet_but_its_other_warnings_are_not():
    result = subprocess.run([sys.executable, "-W", "default", "-c", NOISY_IMPORT.format(module="bitsandbytes")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "gemm_4bit_forward" not in result.stderr
    assert "script_method" not in result.stderr
    assert "a real bitsandbytes warning" in result.stderr


def test_the_filters_are_installed_once(caplog):
    from automodel_cli.components.torchao_import import IMPORT_NOISE, quiet_torchao_import_noise

    quiet_torchao_import_noise()
    quiet_torchao_import_noise()
    for name, words in IMPORT_NOISE:
        logger = logging.getLogger(name)
        assert sum(getattr(f, "words", None) == words for f in logger.filters) == 1
        with caplog.at_level(logging.WARNING, logger=name):
            logger.warning(f"{words} something")
            logger.warning("another message")
        messages = [record.getMessage() for record in caplog.records if record.name == name]
        assert messages == ["another message"]
        caplog.clear()
