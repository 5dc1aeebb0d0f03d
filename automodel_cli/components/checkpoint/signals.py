"""Turn SIGTERM/SIGINT into "save and stop at the next step boundary".

Schedulers (Slurm, Kubernetes) send SIGTERM some time before they kill a job; a user presses
Ctrl-C. Dying mid-step loses everything since the last checkpoint, so the handler only sets a
flag that the training loop checks after each optimizer step. A second Ctrl-C means "really
stop now" and raises ``KeyboardInterrupt`` at once. No torch here.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """Context manager; ``stop.requested`` becomes True once a stop signal arrives.

    Usage::

        with GracefulStop() as stop:
            for step in ...:
                train_one_step()
                if stop.requested:
                    save_checkpoint(...)
                    break

    Handlers can only be installed from the main thread; elsewhere the manager does nothing
    (``requested`` stays False) rather than failing. Previous handlers are restored on exit.
    """

    def __init__(self, signals: tuple[int, ...] = DEFAULT_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        if not self.requested:
            log.warning("Received %s: saving a checkpoint and stopping after the current step "
                        "(press Ctrl-C again to stop immediately).", name)
        self.requested = True
        self.signal_name = self.signal_name or name

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, previous in self._previous.items():
            # None means "installed from C"; the default is the closest we can restore.
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
