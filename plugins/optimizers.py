"""Built-in optimizers (``optim.name``) and learning-rate schedules (``optim.scheduler``).

Targets are dotted paths, so listing them imports nothing heavy. An optimizer's own options live
at ``optim.NAME.*`` and a schedule's at ``optim.NAME.*`` too (no built-in name is shared);
``optim.lr``, ``optim.weight_decay`` and ``optim.warmup_steps``/``min_lr_ratio`` are general.
"""

from __future__ import annotations

from automodel_cli import hookimpl
from automodel_cli.config.schema import option

_OPTIMIZERS = "automodel_cli.components.optim.optimizers"
_SCHEDULES = "automodel_cli.components.optim.schedules"

SGD = {
    "momentum": option((int, float), 0.9, "Momentum factor (0: plain SGD, no optimizer state).", ge=0, lt=1),
    "nesterov": option(bool, False, "Nesterov momentum (needs momentum > 0)."),
}
ADAFACTOR = {
    "beta2_decay": option((int, float), -0.8, "Decay rate of the second-moment average: beta2 at step t is "
                          "1 - t^beta2_decay.", le=0),
    "eps": option((int, float), 1e-3, "Smallest parameter RMS the relative step is scaled by (Adafactor's eps2).",
                  gt=0),
    "clip_threshold": option((int, float), 1.0, "Clip each update to this RMS (Adafactor's d).", gt=0),
}
MUON = {
    "momentum": option((int, float), 0.95, "Momentum of the Muon updates.", ge=0, lt=1),
    "nesterov": option(bool, True, "Nesterov momentum for the Muon updates."),
    "ns_steps": option(int, 5, "Newton-Schulz iterations orthogonalising each update.", ge=1, le=99),
    "adjust_lr": option(str, "match_rms_adamw", "Per-matrix rate scaling: match_rms_adamw (0.2 x sqrt(max(rows, "
                        "cols)): optim.lr suits both parts) or original (sqrt(max(1, rows/cols))).",
                        choices=("match_rms_adamw", "original")),
}
WSD = {
    "decay_fraction": option((int, float), 0.1, "Fraction of all steps, at the end, over which the rate decays "
                             "from the peak to optim.min_lr_ratio.", gt=0, le=1),
    "decay": option(str, "linear", "Shape of the decay.", choices=("linear", "cosine")),
}


@hookimpl
def register_optimizers(registry):
    registry.add("adamw", f"{_OPTIMIZERS}:adamw",
                 description="torch AdamW (optim.betas, optim.eps); decoupled weight decay on matrices.")
    registry.add("sgd", f"{_OPTIMIZERS}:sgd", options=SGD, description="torch SGD with momentum (Nesterov optional).")
    registry.add("adafactor", f"{_OPTIMIZERS}:adafactor", options=ADAFACTOR,
                 description="torch Adafactor: factored second moments, no first moment (little state).")
    registry.add("adamw8bit", f"{_OPTIMIZERS}:adamw8bit", requires=("bitsandbytes",),
                 description="bitsandbytes AdamW with 8-bit moments (needs bitsandbytes: the bnb extra); one process.")
    registry.add("muon", "automodel_cli.components.optim.muon:muon", options=MUON,
                 description="Muon on the decoder layers' weight matrices, AdamW on the rest, in one optimizer.")


@hookimpl
def register_schedulers(registry):
    registry.add("cosine", f"{_SCHEDULES}:cosine", description="Warmup, then half a cosine down to optim.min_lr_ratio.")
    registry.add("linear", f"{_SCHEDULES}:linear", description="Warmup, then a straight line down to optim.min_lr_ratio.")
    registry.add("constant", f"{_SCHEDULES}:constant", description="Warmup, then the peak rate throughout.")
    registry.add("wsd", f"{_SCHEDULES}:wsd", options=WSD,
                 description="Warmup-stable-decay: warmup, the peak rate, then a decay over the last "
                             "optim.wsd.decay_fraction of the steps.")
