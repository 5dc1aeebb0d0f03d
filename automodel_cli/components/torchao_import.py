"""Import torchao (an optional extra) quietly, or stop with the command that installs it.

torchao logs a warning for each of its CUDA kernel libraries that a CPU-only torch cannot load,
and torch one for an enum torchao registers the old way; they say nothing about the
pure-PyTorch parts used here (float8 training, NF4 weights). bitsandbytes (the 8-bit optimizer's
extra) likewise logs that its optional CPU 4-bit kernel package is missing and triggers torch's
``torch.jit.script_method`` deprecation warning. peft imports both whenever they are installed
(at the first save of any run), so every command drops exactly those messages
(``quiet_torchao_import_noise``, installed by the CLI), and ``import_torchao`` holds back the rest
of torchao's import logging.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from typing import Any

from automodel_cli.errors import UserError


#: (logger, words of the message) of the import-time messages dropped.
IMPORT_NOISE = (("torchao", "Failed to load "),
                ("torch.utils._pytree", "is an Enum subclass and is now natively supported by torch.compile"),
                ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"))


class _DropImportNoise(logging.Filter):
    def __init__(self, words: str):
        super().__init__()
        self.words = words

    def filter(self, record: logging.LogRecord) -> bool:
        return self.words not in record.getMessage()


def quiet_torchao_import_noise() -> None:
    """Drop torchao's import-time messages (``IMPORT_NOISE``) from now on, in this process;
    nothing is imported."""
    for name, words in IMPORT_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropImportNoise) and f.words == words for f in logger.filters):
            logger.addFilter(_DropImportNoise(words))
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated", category=DeprecationWarning)


def import_torchao(module: str, *, feature: str, extra: str, instead: str) -> Any:
    """``importlib.import_module(module)`` (a ``torchao`` module) without torchao's load
    warnings; a ``UserError`` naming ``feature``, the extra that installs torchao and ``instead``
    (the setting that needs nothing) when torchao is missing."""
    logger = logging.getLogger("torchao")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{feature} needs the torchao package, which is not installed.",
                        f"Install it with `pip install 'automodel-cli[{extra}]'`, or set {instead}.") from None
    finally:
        logger.setLevel(level)
