"""TensorBoard logger (optional extra: ``pip install 'automodel-cli[tensorboard]'``).

Writes every real-valued metric as a scalar (and histograms, such as a mixture-of-experts
model's tokens per expert) through ``torch.utils.tensorboard.SummaryWriter``,
which in turn needs the ``tensorboard`` package; both are imported only when the logger is
built. Event files go to ``OUTPUT_DIR/tensorboard`` unless ``logging.tensorboard.log_dir`` says
otherwise (relative paths are inside the output directory).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from automodel_cli.components.logging.base import histogram_summary, scalar_items
from automodel_cli.errors import UserError, did_you_mean

INSTALL_HINT = "pip install 'automodel-cli[tensorboard]'"
DEFAULT_SUBDIR = "tensorboard"
#: logging.tensorboard keys -> SummaryWriter arguments.
OPTIONS = {"log_dir", "flush_secs", "max_queue", "filename_suffix"}


def _summary_writer_class():
    try:
        import tensorboard  # noqa: F401  (torch's import error would not name the extra)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("logger tensorboard needs the tensorboard package:", INSTALL_HINT) from None
    return SummaryWriter


class TensorBoardLogger:
    """Scalars per optimizer step; ``close`` flushes and closes the event file."""

    def __init__(self, config: Mapping[str, Any], output_dir: Path) -> None:
        options = dict(config or {})
        unknown = sorted(set(options) - OPTIONS)
        if unknown:
            raise UserError(
                f"Unknown option logging.tensorboard.{unknown[0]}.{did_you_mean(unknown[0], OPTIONS)}",
                f"Allowed: {', '.join(sorted(OPTIONS))}.",
            )
        log_dir = Path(options.pop("log_dir", DEFAULT_SUBDIR)).expanduser()
        self.log_dir = log_dir if log_dir.is_absolute() else Path(output_dir) / log_dir
        writer_class = _summary_writer_class()
        self.writer = writer_class(log_dir=str(self.log_dir), **options)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in scalar_items(metrics):
            self.writer.add_scalar(key, value, global_step=int(step))

    def log_histograms(self, histograms: Mapping[str, list[float]], step: int) -> None:
        """One histogram per tag, bin i holding ``counts[i]`` (``add_histogram_raw``: the bins
        are exactly the given ones, e.g. one per expert)."""
        for tag, counts in histograms.items():
            summary = histogram_summary(counts)
            if not summary["num"]:
                continue
            self.writer.add_histogram_raw(tag, min=summary["min"], max=summary["max"], num=summary["num"],
                                          sum=summary["sum"], sum_squares=summary["sum_squares"],
                                          bucket_limits=summary["edges"][1:], bucket_counts=list(counts),
                                          global_step=int(step))

    def close(self) -> None:
        self.writer.close()
