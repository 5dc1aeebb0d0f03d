"""Expert parallelism: each process of an ep group holds ``E / ep`` of every layer's experts, so
the tokens routed to an expert travel to the process that owns it, are computed there, and travel
back (``expert_parallel``). Also what turns a model's experts into shards (``shard_experts``) and
sums their gradients over the processes holding the same experts (``sum_replica_grads``).

The exchange is two differentiable all-to-alls (functional collectives with autograd), whose split
sizes come from an all-to-all of the per-expert token counts; their backward sends the gradients
the same way back. Every token reaches its expert: no capacity, no dropping, so the result equals
the single-process computation up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from automodel_cli.components.moe.experts import expert_state, experts_modules, local
from automodel_cli.errors import UserError


@dataclass(frozen=True)
class ExpertGroup:
    """This process's expert-parallel group (``size`` processes, this one at ``rank``) and the
    group of processes holding the same experts (None: no other does)."""

    group: Any
    size: int
    rank: int
    replicas: Any = None

    def run(self, x: torch.Tensor, counts: torch.Tensor,
            compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return expert_parallel(x, counts, compute, self)


def expert_parallel(x: torch.Tensor, counts: torch.Tensor, compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    ep: ExpertGroup) -> torch.Tensor:
    """``x [S, H]``: this process's (token, expert) rows sorted by global expert, ``counts [E]``
    how many rows each expert has. Sends each expert's rows to its owner (process ``e // (E/ep)``
    of the group), where ``compute(rows, offsets)`` runs its local experts on the rows grouped by
    local expert, and returns the results in ``x``'s order."""
    import torch.distributed as dist

    per_rank = counts.numel() // ep.size
    sent = counts.view(ep.size, per_rank)  # [destination, local expert]
    received = torch.empty_like(sent)  # [source, local expert]
    dist.all_to_all_single(received, sent.contiguous(), group=ep.group)
    send_sizes = sent.sum(1).tolist()
    recv_sizes = received.sum(1).tolist()
    rows = _exchange(x, recv_sizes, send_sizes, ep.group)
    # Rows arrive by source, then local expert; the experts want them by local expert, then source.
    source = torch.arange(ep.size, device=x.device).repeat_interleave(per_rank)
    expert = torch.arange(per_rank, device=x.device).repeat(ep.size)
    key = torch.repeat_interleave(expert * ep.size + source, received.flatten())
    order = torch.argsort(key, stable=True)
    offsets = torch.cumsum(received.sum(0), 0, dtype=torch.int32)
    out = compute(rows[order], offsets)
    back = torch.empty_like(out).index_copy(0, order, out)
    return _exchange(back, send_sizes, recv_sizes, ep.group)


def _exchange(tensor: torch.Tensor, output_sizes: list[int], input_sizes: list[int], group: Any) -> torch.Tensor:
    """Differentiable all-to-all of rows: ``input_sizes[j]`` rows go to process j, ``output_sizes[j]``
    come from it; the backward sends the gradients back the same way."""
    try:
        from torch.distributed._functional_collectives import all_to_all_single_autograd
    except ImportError:  # older torch: the (since deprecated) autograd collectives
        from torch.distributed.nn.functional import all_to_all_single

        out = tensor.new_empty((sum(output_sizes), *tensor.shape[1:]))
        return all_to_all_single(out, tensor.contiguous(), output_split_sizes=output_sizes,
                                 input_split_sizes=input_sizes, group=group)
    return all_to_all_single_autograd(tensor.contiguous(), output_sizes, input_sizes, group)


def shard_experts(model: Any, mesh: Any, ep: int) -> set[Any]:
    """Split every experts module ``install_experts`` prepared ``ep`` ways over this rank's
    expert-parallel group: each expert-stacked parameter becomes a ``Shard(0)`` ``DTensor`` on the
    1-D "ep" mesh holding this rank's experts (slices of the loaded weights, or still-empty meta
    tensors that ``materialize`` fills). Returns those parameters (FSDP must ignore them).
    Collective: every rank calls it."""
    from torch.distributed.tensor import DTensor, Shard

    from automodel_cli.components.distributed.mesh import expert_groups

    modules = experts_modules(model)
    if not modules:
        raise UserError(
            f"distributed.ep={ep} needs a mixture-of-experts model whose experts automodel knows, and this "
            f"{type(model).__name__} has none (`automodel list moe-blocks` lists the kinds).",
            "Set distributed.ep=1, or install a plugin that registers the model's experts (register_moe_blocks).")
    ep_mesh, replicas = expert_groups(mesh, ep)
    group = ExpertGroup(ep_mesh.get_group(), ep, ep_mesh.get_local_rank(), replicas)
    sharded = set()
    for module in modules:
        state = expert_state(module)
        if state.num_experts % ep:
            raise UserError(
                f"distributed.ep={ep} must divide the number of experts, but {type(module).__name__} has "
                f"{state.num_experts}.",
                f"Choose a distributed.ep that divides {state.num_experts} and distributed.dp_shard.")
        for name in state.names:
            param = getattr(module, name)
            if isinstance(param, DTensor):
                raise UserError(f"The experts of {type(module).__name__} are already distributed "
                                f"({param.placements}); expert parallelism must come first.",
                                "Report the problem: expert parallelism is applied before the tensor-parallel plan.")
            part = param.detach().chunk(ep, dim=0)[group.rank].clone()
            shard = DTensor.from_local(part, ep_mesh, [Shard(0)], run_check=False)
            new = torch.nn.Parameter(shard, requires_grad=param.requires_grad)
            setattr(module, name, new)
            sharded.add(new)
        state.ep = group
    return sharded


def sum_replica_grads(model: Any) -> None:
    """Sum the expert gradients over the processes that hold the same experts (each summed only
    the tokens its own ep group routed to them), so every replica steps with the gradient of the
    whole batch. Collective over each replica group; a no-op without expert parallelism or
    replicas. Call before clipping."""
    import torch.distributed as dist

    for module in experts_modules(model):
        ep = expert_state(module).ep
        if ep is None or ep.replicas is None:
            continue
        for name in expert_state(module).names:
            param = getattr(module, name)
            if not param.requires_grad:
                continue
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(local(param.grad), op=dist.ReduceOp.SUM, group=ep.replicas)
