"""The router's balance loss and the expert load of a mixture-of-experts model.

A ``BalanceMonitor`` is attached to a model (``attach_monitor``) when the model has routers: the
modules its ``_can_record_outputs["router_logits"]`` recorder names (Hugging Face's own record
of which module's output, and which element of it, is the router logits), found by class the way
transformers finds them, so peft, FSDP2 and compiled layers change nothing. Forward hooks on
those modules keep the logits only while ``training_loss`` computes a training loss
(``monitor.recording()``): evaluation forwards and the recomputation of activation
checkpointing in backward record nothing.

Per micro-batch, from the recorded logits of all layers:

* the **load-balancing loss**, exactly ``load_balancing_loss_func`` of the modeling files
  (Switch Transformer, eqs. 4-6): over all layers' (token, expert) pairs, ``f_e`` = the fraction
  of top-k assignments to expert e (top-k of the softmax, k = ``num_experts_per_tok``) and
  ``P_e`` = the mean router probability of e; ``aux = E * sum_e f_e * P_e`` (with ``f``
  summing to k, a perfectly even router gives k; HF's ``outputs.aux_loss``). Padding tokens are left out (``token_mask``).
* the **router z-loss** (ST-MoE): the mean over layers and real tokens of
  ``logsumexp(logits)^2``, computed only when its coefficient is not zero.
* the **expert load**: real tokens assigned to each expert in each layer, ``[layers, experts]``.

Normalisation: each micro-batch's terms are divided by ``micro_batches``, the number of
micro-batches of the optimizer step over all data-parallel ranks (the run sets it), and added
to the loss as ``aux_coef * aux + z_coef * z``; the sums over a step, all-reduced over the
data-parallel ranks, are then the mean over the step's micro-batches, the same on one process
or many. ``take_step`` hands the step's detached sums and loads to the run and starts afresh.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from automodel_cli.components.loss.targets import IGNORE_INDEX
from automodel_cli.components.models import structure

_MONITORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class StepBalance:
    """One optimizer step's router terms on this rank: ``sums`` (0-d tensors, ``aux_loss`` and
    with a z coefficient ``z_loss``, each already divided by the step's micro-batches, so their
    sum over data-parallel ranks is the step's mean) and ``load`` (tokens per expert per layer,
    ``[layers, experts]``, float32)."""

    sums: dict[str, Any]
    load: Any


@dataclass
class BalanceMonitor:
    """Records router logits during a training loss and turns them into the balance terms (see
    the module docstring). ``aux_coef``/``z_coef`` weight the terms in the loss."""

    routers: list[Any]
    index: int
    num_experts: int
    top_k: int
    aux_coef: float
    z_coef: float = 0.0
    micro_batches: int = 1
    experts: list[Any] = field(default_factory=list)  # the routers' experts modules, when found
    _captured: list[Any] | None = None
    _chosen: list[Any] = field(default_factory=list)  # the experts each token was sent to, per layer
    _handles: list[Any] = field(default_factory=list)
    _sums: dict[str, Any] = field(default_factory=dict)
    _load: Any = None

    def __post_init__(self) -> None:
        self._handles = [router.register_forward_hook(self._hook) for router in self.routers]
        self._handles += [module.register_forward_pre_hook(self._experts_hook, with_kwargs=True)
                          for module in self.experts]

    def _hook(self, _module: Any, _args: Any, output: Any) -> None:
        if self._captured is not None:
            self._captured.append(output[self.index] if isinstance(output, (tuple, list)) else output)

    def _experts_hook(self, _module: Any, args: tuple, kwargs: dict) -> None:
        """The experts a layer's tokens actually go to (``top_k_index``, the second argument of a
        Hugging Face experts forward): what the expert load counts, exact also for routers whose
        choice is not the top-k of their logits (DeepSeek's biased, group-limited routing)."""
        if self._captured is not None:
            chosen = args[1] if len(args) > 1 else kwargs.get("top_k_index")
            if chosen is not None:
                self._chosen.append(getattr(chosen, "to_local", lambda: chosen)())

    @contextlib.contextmanager
    def recording(self):
        """Keep the router logits of the forward passes inside the block (a list, in layer order)."""
        self._captured, self._chosen = [], []
        try:
            yield self._captured
        finally:
            self._captured = None

    def add_to(self, loss: Any, logits: list[Any], token_mask: Any = None) -> Any:
        """``loss`` plus this micro-batch's weighted router terms (with their graph), after
        adding their detached values and the expert load to the step's sums. ``logits``: what
        ``recording`` kept; ``token_mask``: 1 for real tokens, 0 for padding (``token_mask``)."""
        if not logits:
            return loss
        import torch

        with torch.set_grad_enabled(torch.is_grad_enabled() and bool(self.aux_coef or self.z_coef)):
            chosen = self._chosen if len(self._chosen) == len(logits) else None
            aux, z, load = balance_terms(logits, self.num_experts, self.top_k, token_mask, with_z=bool(self.z_coef),
                                         chosen=chosen)
            share = 1.0 / self.micro_batches
            terms = {"aux_loss": aux * share}
            if z is not None:
                terms["z_loss"] = z * share
            for name, value in terms.items():
                self._sums[name] = self._sums.get(name, 0) + value.detach()
            self._load = load if self._load is None else self._load + load
            if not self.aux_coef and z is None:
                return loss
            added = self.aux_coef * terms["aux_loss"] + (self.z_coef * terms["z_loss"] if z is not None else 0)
            return loss + added.to(loss.device, loss.dtype)

    def take_step(self) -> StepBalance | None:
        """The step's sums and expert load so far (None when no training loss recorded any), and
        a fresh start for the next step."""
        if self._load is None:
            return None
        step = StepBalance(dict(self._sums), self._load)
        self._sums, self._load = {}, None
        return step

    def describe(self) -> str:
        z = f", z-loss coefficient {self.z_coef:g}" if self.z_coef else ""
        return (f"router balance: {len(self.routers)} routers, {self.num_experts} experts, top-{self.top_k}; "
                f"aux-loss coefficient {self.aux_coef:g}{z}")

    def detach(self) -> None:
        """Remove the hooks (the model no longer carries a monitor)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def balance_terms(logits: list[Any], num_experts: int, top_k: int, token_mask: Any = None,
                  with_z: bool = False, chosen: list[Any] | None = None) -> tuple[Any, Any, Any]:
    """``(aux, z, load)`` of one forward pass from each layer's router logits (``[tokens,
    experts]`` or ``[batch, seq, experts]``): HF's load-balancing loss, the z-loss (None unless
    ``with_z``) and the real tokens per expert per layer (``[layers, experts]``, no graph).
    ``token_mask`` (any shape with one entry per token; None: every token counts) leaves padding
    out of all three; when its size is not the logits' token count (the router saw a shard of the
    sequence) every token counts."""
    import torch

    device = logits[0].device
    weights = None
    if token_mask is not None and token_mask.numel() == logits[0].numel() // logits[0].shape[-1]:
        weights = token_mask.reshape(-1).to(device=device, dtype=torch.float32)
    assigned = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probability = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows: Any = 0.0
    z_sum: Any = 0.0
    loads = []
    for i, layer in enumerate(logits):
        layer = layer.reshape(-1, layer.shape[-1]).to(device)
        probs = torch.softmax(layer.float(), dim=-1)
        selected = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)
        row_weights = weights if weights is not None else torch.ones(layer.shape[0], device=device)
        load = torch.zeros(num_experts, dtype=torch.float32, device=device).scatter_add_(
            0, selected, row_weights.repeat_interleave(top_k))
        if chosen is not None and chosen[i].numel() == selected.numel():  # the experts actually used
            loads.append(torch.zeros(num_experts, dtype=torch.float32, device=device).scatter_add_(
                0, chosen[i].reshape(-1).to(device), row_weights.repeat_interleave(top_k)))
        else:
            loads.append(load)
        assigned = assigned + load
        probability = probability + (probs * row_weights.unsqueeze(-1)).sum(dim=0)
        rows = rows + row_weights.sum()
        if with_z:
            z_sum = z_sum + (torch.logsumexp(layer.float(), dim=-1).square() * row_weights).sum()
    rows = torch.clamp(torch.as_tensor(rows, device=device), min=1.0)
    aux = num_experts * torch.sum((assigned / rows) * (probability / rows))
    return aux, (z_sum / rows if with_z else None), torch.stack(loads).detach()


def load_metrics(load: Any) -> dict[str, float]:
    """``expert_load_max_mean`` (mean over layers of the busiest expert's tokens over the mean
    expert's: 1.0 is perfectly even, ``num_experts`` is every token on one expert) and
    ``expert_load_max_mean_layer{i}`` per layer, from tokens per expert ``[layers, experts]``."""
    ratios = (load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-12)).tolist()
    return {"expert_load_max_mean": sum(ratios) / len(ratios),
            **{f"expert_load_max_mean_layer{i}": ratio for i, ratio in enumerate(ratios)}}


def load_histograms(load: Any) -> dict[str, list[float]]:
    """``expert_load/layer{i}`` -> tokens per expert of layer i (expert index = bin)."""
    return {f"expert_load/layer{i}": row for i, row in enumerate(load.tolist())}


def token_mask(inputs: dict[str, Any], labels: Any = None) -> Any:
    """1 for each real token of a batch, 0 for padding; None when nothing is padding.

    Padded batches carry an ``attention_mask`` (the collators' right padding). Packed batches
    carry ``position_ids`` and no mask: the collator pads a row's end with a dummy document
    (positions restarting at 0) in which no token is trained, so a row's last document whose
    labels are all ignored counts as padding (a pre-training block ending on a one-token document
    that is ``[BOS]`` or a document's first token therefore leaves that one token out too)."""
    mask = inputs.get("attention_mask")
    if mask is not None and getattr(mask, "dim", lambda: 0)() == 2:
        return mask
    positions = inputs.get("position_ids")
    if positions is None or labels is None or positions.dim() != 2 or positions.shape != labels.shape:
        return None
    import torch

    positions = positions.to(labels.device)
    index = torch.arange(positions.shape[1], device=labels.device).expand_as(positions)
    # start of each row's last document: the last position-id reset to 0
    last_start = torch.where(positions == 0, index, torch.zeros_like(index)).amax(dim=1, keepdim=True)
    tail = index >= last_start
    trained_in_tail = ((labels != IGNORE_INDEX) & tail).any(dim=1, keepdim=True)
    padding = tail & ~trained_in_tail & (last_start > 0)
    return None if not bool(padding.any()) else (~padding).long()


# ------------------------------------------------------------------------- attaching


@contextlib.contextmanager
def router_terms(model: Any, inputs: dict[str, Any], labels: Any = None) -> Iterator[Callable[[Any], Any]]:
    """Around a training forward pass: yields ``add(loss)``, which returns ``loss`` plus the
    router terms of the forwards run inside the block (``BalanceMonitor.add_to``) when ``model``
    carries a monitor, else ``loss`` unchanged. Any recipe's own loss computation gets the
    balance loss this way (``training_loss`` and distillation use it)."""
    monitor = monitor_of(model)
    if monitor is None:
        yield lambda loss: loss
        return
    with monitor.recording() as logits:
        yield lambda loss: monitor.add_to(loss, logits, token_mask(inputs, labels))


def attach_monitor(model: Any, aux_coef: float | None = None, z_coef: float | None = None) -> BalanceMonitor | None:
    """A ``BalanceMonitor`` on ``model``'s routers, remembered for ``monitor_of(model)``, or None
    for a model without routers. ``aux_coef``/``z_coef`` None: the config's
    ``router_aux_loss_coef`` / ``router_z_loss_coef`` (z: 0 when the config has none)."""
    found = find_routers(model)
    if found is None:
        return None
    routers, index = found
    config = structure.unwrap(_inner(model)).config
    num_experts, top_k = structure.num_experts(config), structure.experts_per_token(config)
    if num_experts is None or top_k is None:
        return None
    previous = monitor_of(model)
    if previous is not None:
        previous.detach()
    monitor = BalanceMonitor(
        routers, index, int(num_experts), int(top_k), experts=experts_of(model, routers),
        aux_coef=float(aux_coef if aux_coef is not None else getattr(config, "router_aux_loss_coef", 0.0) or 0.0),
        z_coef=float(z_coef if z_coef is not None else getattr(config, "router_z_loss_coef", 0.0) or 0.0))
    _MONITORS[model] = monitor
    return monitor


def monitor_of(model: Any) -> BalanceMonitor | None:
    """The monitor ``attach_monitor`` put on this model object, if any."""
    try:
        return _MONITORS.get(model)
    except TypeError:  # not weak-referenceable
        return None


def find_routers(model: Any) -> tuple[list[Any], int] | None:
    """``(router modules in forward order, index of the logits in their output)`` from the
    ``router_logits`` recorder of the first submodel that declares one; None without routers."""
    spec = None
    for module in model.modules():
        recorders = getattr(type(module), "_can_record_outputs", None) or {}
        spec = recorders.get("router_logits") if isinstance(recorders, dict) else None
        if spec is not None:
            break
    if spec is None:
        return None
    spec = spec[0] if isinstance(spec, list) else spec
    target = getattr(spec, "target_class", spec if isinstance(spec, type) else None)
    layer_name = getattr(spec, "layer_name", None)
    routers = [module for name, module in model.named_modules()
               if target is not None and isinstance(module, target)
               and (layer_name is None or f".{layer_name.strip('.')}." in f".{name}.")]
    return (routers, int(getattr(spec, "index", 0))) if routers else None


def experts_of(model: Any, routers: list[Any]) -> list[Any]:
    """The experts module beside each router (its MoE block's ``experts`` child), or [] when some
    router has none: the load then counts the top-k of the router logits."""
    import torch

    parents = {id(child): module for module in model.modules() for child in module.children()}
    found = [getattr(parents.get(id(router)), "experts", None) for router in routers]
    return found if all(isinstance(module, torch.nn.Module) for module in found) else []


def _inner(model: Any) -> Any:
    """The module inside a ``torch.compile`` wrapper."""
    return getattr(model, "_orig_mod", model)
