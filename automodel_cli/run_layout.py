"""The layout of a run's output directory, in one place.

Every part that reads or writes a run directory (the training loop, checkpoints, consolidate,
the launchers, ``automodel checkpoint``) names its files through ``RunDir``, so the layout is
written down once::

    OUTPUT_DIR/
        config.yaml            the resolved config in force (secrets redacted)
        config_history.jsonl   what each resume changed (only after such a resume)
        metrics.jsonl          one JSON object per optimizer step
        summary.json           written when the run finishes
        final/                 the Hugging Face model (or adapter) directory
        base_model/            the random base of an adapter trained from scratch
        checkpoints/           resumable checkpoints and the ``latest`` pointer
        launch/                what a launcher wrote: the frozen config, job.json, scripts
        .automodel.lock        who runs (or last ran) here

No imports beyond the standard library: every layer may use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    """A run directory; ``RunDir(path).metrics`` and so on are the paths of its parts."""

    path: Path

    CONFIG = "config.yaml"
    HISTORY = "config_history.jsonl"
    METRICS = "metrics.jsonl"
    SUMMARY = "summary.json"
    FINAL = "final"
    BASE_MODEL = "base_model"
    CHECKPOINTS = "checkpoints"
    LAUNCH = "launch"
    LOCK = ".automodel.lock"
    #: What marks a directory as holding a run (a new run there is refused).
    MARKERS = (CONFIG, METRICS, CHECKPOINTS, FINAL)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    config = property(lambda self: self.path / self.CONFIG)
    history = property(lambda self: self.path / self.HISTORY)
    metrics = property(lambda self: self.path / self.METRICS)
    summary = property(lambda self: self.path / self.SUMMARY)
    final = property(lambda self: self.path / self.FINAL)
    base_model = property(lambda self: self.path / self.BASE_MODEL)
    checkpoints = property(lambda self: self.path / self.CHECKPOINTS)
    launch = property(lambda self: self.path / self.LAUNCH)
    lock = property(lambda self: self.path / self.LOCK)

    def holds_run(self) -> bool:
        """Whether a run has written here (its config, metrics, checkpoints or final model)."""
        return self.path.is_dir() and any((self.path / marker).exists() for marker in self.MARKERS)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)
