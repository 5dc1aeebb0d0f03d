"""What every layer may ask about the process it runs in, without importing launcher code.

A rank that ``torchrun`` started has ``LOCAL_RANK`` and ``WORLD_SIZE`` in its environment. The
launchers act on it (``components/launch``), and config resolution needs it too (a launched
rank need not have the launcher installed that started it), so the test lives here, below both.
"""

from __future__ import annotations

import os

TORCHRUN_ENV = ("LOCAL_RANK", "WORLD_SIZE")


def inside_torchrun() -> bool:
    """True in a process that ``torchrun`` started (a rank of a launched job)."""
    return all(name in os.environ for name in TORCHRUN_ENV)
