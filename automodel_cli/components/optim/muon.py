"""``optim.name=muon``: Muon on the decoder layers' weight matrices, AdamW on everything else.

Muon (momentum, then Newton-Schulz orthogonalisation of the update) is meant for the 2-D weight
matrices of the hidden layers; embeddings, the LM head, norms and biases train with AdamW. Both
run inside one ``torch.optim.Optimizer`` whose param groups say which algorithm updates them, so
the run's one optimizer, one schedule and its checkpoints (DCP, resharding) work unchanged. The
updates themselves are torch's own ``torch.optim.Muon`` and ``torch.optim.AdamW``: each step
hands them this optimizer's groups and state.
"""

from __future__ import annotations

from typing import Any

import torch

from automodel_cli.components.optim.build import OptimizerSettings
from automodel_cli.errors import UserError

#: The group key that says which algorithm updates a group.
ALGORITHM = "algorithm"


def hidden_matrices(model: Any) -> set[str]:
    """Names (as ``model.named_parameters`` gives them) of the trainable 2-D parameters inside
    the decoder layers: attention and MLP projections (and LoRA's A and B), not the embeddings,
    the LM head, norms, biases or 3-D expert weights."""
    from automodel_cli.components.models.structure import decoder_stack

    prefix, stack = decoder_stack(model)
    layers = {id(p) for p in stack.layers.parameters()}
    return {name for name, p in model.named_parameters()
            if p.requires_grad and p.ndim == 2 and id(p) in layers and name.startswith(prefix)}


def muon(settings: OptimizerSettings) -> Any:
    if not hasattr(torch.optim, "Muon"):
        raise UserError(f"optim.name=muon needs torch.optim.Muon (torch 2.9 or newer); this is torch "
                        f"{torch.__version__}.", "Upgrade torch, or use optim.name=adamw.")
    options = settings.options
    hidden = hidden_matrices(settings.model)
    named = settings.named_trainable()
    groups = [{"params": [p for n, p in named if n in hidden], "weight_decay": settings.weight_decay, ALGORITHM: "muon"}]
    groups += [{**group, ALGORITHM: "adamw"} for group in settings.param_groups([(n, p) for n, p in named if n not in hidden])]
    groups = [group for group in groups if group["params"]]
    muon_options = {"momentum": float(options["momentum"]), "nesterov": bool(options["nesterov"]),
                    "ns_steps": int(options["ns_steps"]), "adjust_lr_fn": options["adjust_lr"]}
    adamw_options = {"betas": settings.betas, "eps": settings.eps, "foreach": True}
    return MuonWithAdamW(groups, lr=settings.lr, muon=muon_options, adamw=adamw_options)


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer over groups tagged ``algorithm: muon`` or ``algorithm: adamw``."""

    def __init__(self, groups: list[dict[str, Any]], *, lr: float, muon: dict[str, Any], adamw: dict[str, Any]):
        # The torch optimizers fill each group with their defaults; this optimizer then owns the
        # same group dicts (and after a checkpoint load, the loaded ones) and one state.
        self._algorithms: dict[str, Any] = {}
        for algorithm, cls, options in (("muon", torch.optim.Muon, muon), ("adamw", torch.optim.AdamW, adamw)):
            mine = [group for group in groups if group[ALGORITHM] == algorithm]
            if mine:
                self._algorithms[algorithm] = cls(mine, lr=lr, **options)
        super().__init__(groups, {"lr": lr})

    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for algorithm, optimizer in self._algorithms.items():
            optimizer.param_groups = [group for group in self.param_groups if group[ALGORITHM] == algorithm]
            optimizer.state = self.state
            optimizer.step()
        return loss
