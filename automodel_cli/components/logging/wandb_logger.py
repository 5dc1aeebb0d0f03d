"""Weights & Biases logger (optional extra: ``pip install 'automodel-cli[wandb]'``).

``wandb`` is imported only when this logger is built. So that a run never stalls on a login
prompt or a missing network, the mode defaults to ``offline`` (files under the run's output
directory, uploadable later with ``wandb sync``) unless the user chose a mode
(``logging.wandb.mode`` or ``WANDB_MODE``) or credentials are available. Secrets never reach the
W&B config: keys that look like tokens, API keys or passwords are dropped from the run config.
"""

from __future__ import annotations

import inspect
import logging
import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from automodel_cli.components.logging.base import histogram_summary, plain_metrics, redact
from automodel_cli.errors import UserError, did_you_mean

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'automodel-cli[wandb]'"
DEFAULT_HOST = "https://api.wandb.ai"


def import_wandb():
    try:
        import wandb
    except ImportError:
        raise UserError("logger wandb needs the wandb package:", INSTALL_HINT) from None
    return wandb


def has_credentials(environ: Mapping[str, str]) -> bool:
    """Whether wandb could authenticate without prompting: an API key or identity token in
    the environment, or a netrc entry for the W&B host (what ``wandb login`` writes)."""
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(environ.get("WANDB_BASE_URL") or DEFAULT_HOST).hostname or ""
    path = environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def init_kwargs(options: Mapping[str, Any], output_dir: Path, environ: Mapping[str, str],
                allowed: set[str]) -> dict[str, Any]:
    """``wandb.init`` arguments from ``logging.wandb`` plus the offline/dir defaults. Options left
    at their defaults (null, an empty list or mapping) are not passed: wandb's own defaults apply."""
    options = {k: v for k, v in options.items() if v is not None and v != [] and v != {}}
    unknown = sorted(set(options) - allowed)
    if unknown:
        key = unknown[0]
        secret = " Credentials belong in WANDB_API_KEY or `wandb login`, never in a config." \
            if redact({key: 1}) == {} else ""
        raise UserError(
            f"logging.wandb.{key} is not an argument of wandb.init.{did_you_mean(key, allowed)}{secret}",
            f"Allowed: {', '.join(sorted(allowed))}.",
        )
    kwargs = dict(options)
    if "mode" not in kwargs and not environ.get("WANDB_MODE") and not has_credentials(environ):
        kwargs["mode"] = "offline"
        log.info("No W&B credentials found: logging offline under %s (upload later with `wandb sync`).",
                 output_dir)
    if "dir" not in kwargs and not environ.get("WANDB_DIR"):
        kwargs["dir"] = str(output_dir)
    if "dir" in kwargs:
        Path(kwargs["dir"]).mkdir(parents=True, exist_ok=True)
    return kwargs


class WandbLogger:
    """Logs each step's metrics to one W&B run; ``close`` finishes the run."""

    def __init__(self, config: Mapping[str, Any], run_config: Mapping[str, Any], output_dir: Path) -> None:
        wandb = import_wandb()
        allowed = set(inspect.signature(wandb.init).parameters) - {"config"}
        kwargs = init_kwargs(config or {}, Path(output_dir), os.environ, allowed)
        try:
            self.run = wandb.init(config=redact(dict(run_config or {})), **kwargs)
        except wandb.errors.Error as exc:
            raise UserError(
                f"wandb could not start a run: {exc}",
                "Check `wandb login`/WANDB_API_KEY, or log without network with logging.wandb.mode=offline.",
            ) from None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(plain_metrics(metrics), step=int(step))

    def log_histograms(self, histograms: Mapping[str, list[float]], step: int) -> None:
        """One ``wandb.Histogram`` per tag with exactly the given bins (bin i: ``counts[i]``)."""
        wandb = import_wandb()
        self.run.log({tag: wandb.Histogram(np_histogram=(list(counts), histogram_summary(counts)["edges"]))
                      for tag, counts in histograms.items()}, step=int(step))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
