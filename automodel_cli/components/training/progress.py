"""A progress bar with loss (and a mixture-of-experts model's router aux loss and expert load), tokens/s and ETA
(rich), or plain lines when not on a terminal."""

from __future__ import annotations

import sys
import time
from typing import Any


class TrainingProgress:
    def __init__(self, total_steps: int, start_step: int, enabled: bool = True):
        self.total = total_steps
        self.enabled = enabled
        self.start_time = time.perf_counter()
        self.start_step = start_step
        self._progress: Any = None
        self._task: Any = None
        self.interactive = enabled and sys.stderr.isatty()
        self._next_plain = start_step

    def __enter__(self) -> TrainingProgress:
        if self.interactive:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("train", total=self.total, completed=self.start_step,
                                                 loss="-", tps="-")
        return self

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        loss = f"{metrics['loss']:.4f}"
        if "aux_loss" in metrics:  # a mixture-of-experts model's router balance loss and expert load
            load = metrics.get("expert_load_max_mean")
            loss += f" (aux {metrics['aux_loss']:.4f}" + (f", load max/mean {load:.2f})" if load is not None else ")")
        tps = f"{metrics['tokens_per_s']:,.0f}"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, loss=loss, tps=tps)
        elif self.enabled and (step >= self._next_plain or step == self.total):
            elapsed = time.perf_counter() - self.start_time
            done = step - self.start_step
            eta = elapsed / done * (self.total - step) if done else 0.0
            print(f"step {step}/{self.total}  loss {loss}  {tps} tok/s  eta {eta:.0f}s",
                  file=sys.stderr, flush=True)
            self._next_plain = step + max(1, self.total // 10)

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message)
        else:
            print(message, file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
