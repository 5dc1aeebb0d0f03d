"""The device mesh: how the processes of a run split into data- and tensor-parallel groups.

A run has ``world_size = dp_replicate x dp_shard x cp x tp`` processes laid out on a 4-D
``DeviceMesh`` with the dimension names ``("dp_replicate", "dp_shard", "cp", "tp")`` (tp
innermost, so a tensor-parallel group sits on neighbouring ranks, i.e. inside one node):

* ``tp`` ranks hold slices of the same layers and must see the **same** data;
* ``cp`` ranks (context parallelism) read the **same** samples and each trains a part of every
  sequence's tokens (``context_parallel.py``); they train the same weights, so parameters are
  sharded over ``dp_shard x cp`` (one flattened "dp_shard_cp" dimension) and their gradients
  summed there;
* ``dp_shard`` ranks shard parameters, gradients and optimizer state (FSDP2);
* ``dp_replicate`` ranks hold replicas of those shards (HSDP when > 1, e.g. one replica per node).

Expert parallelism (``ep``, mixture-of-experts models) is carved out of the ``dp_shard`` ranks:
``ep`` neighbouring dp_shard ranks (the same dp_replicate and tp coordinates) form an expert-parallel
group that splits every experts module's experts ``ep`` ways; the ranks that hold the same experts
(the same place in their ep group, across the other ep groups and dp_replicate) form its replica
group, over which expert gradients are summed (``expert_groups``). Every rank still reads its own
data: ep changes where experts live, not which samples a rank trains on.

The data-parallel coordinates that decide which samples a rank reads are ``dp_rank(mesh)`` and
``dp_world_size(mesh)`` (replicate x shard, flattened; cp excluded). ``fsdp_mesh(mesh)`` is what
``fully_shard`` receives (1-D for FSDP, 2-D for HSDP) and ``dp_mesh(mesh)`` a flattened 1-D
"dp" mesh whose process group sums counts that every cp rank holds whole; ``all_reduce_loss``
sums per-rank losses over dp x cp (a cp rank's loss covers only its part of the tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from automodel_cli.components.models.structure import num_experts
from automodel_cli.errors import UserError

DIM_NAMES = ("dp_replicate", "dp_shard", "cp", "tp")

#: flattened dp meshes and dp x cp process groups, keyed by id() of their root mesh (built once,
#: collectively).
_DP_MESHES: dict[int, tuple[Any, Any, Any]] = {}
#: expert-parallel groups, keyed by (id() of their root mesh, ep).
_EP_GROUPS: dict[tuple[int, int], tuple[Any, Any]] = {}
#: pipeline meshes: id() of a stage's 4-D mesh -> (that mesh, the 1-D "pp" mesh, all ranks, the root).
_PIPELINES: dict[int, tuple[Any, Any, Any, Any]] = {}


@dataclass(frozen=True)
class MeshShape:
    """Sizes of the mesh dimensions (``pp`` outermost, then dp_replicate, dp_shard, cp, tp);
    their product is the number of processes. ``ep`` (expert parallelism) divides ``dp_shard``:
    it groups dp_shard ranks, it adds no dimension."""

    dp_replicate: int
    dp_shard: int
    tp: int
    ep: int = 1
    cp: int = 1
    pp: int = 1

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    def as_dict(self) -> dict[str, int]:
        pipeline = {"pp": self.pp} if self.pp > 1 else {}
        context = {"cp": self.cp} if self.cp > 1 else {}
        sizes = {**pipeline, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, **context, "tp": self.tp}
        return {**sizes, "ep": self.ep} if self.ep > 1 else sizes

    def describe(self) -> str:
        experts = f" (experts split ep={self.ep} ways inside dp_shard)" if self.ep > 1 else ""
        pipeline = f"pp={self.pp} x " if self.pp > 1 else ""
        context = f" x cp={self.cp}" if self.cp > 1 else ""
        return (f"{pipeline}dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard}{context} x tp={self.tp} "
                f"= {self.world_size} process(es){experts}")

    @classmethod
    def resolve(cls, dp_replicate: int = 1, dp_shard: int = -1, tp: int = 1,
                world_size: int = 1, ep: int = 1, *, cp: int = 1, pp: int = 1) -> MeshShape:
        """Check the configured sizes against ``world_size``; ``dp_shard=-1`` takes the rest;
        ``ep`` must divide the resulting dp_shard; ``cp`` (context parallelism) and ``pp``
        (pipeline stages) multiply the world size like tp; cp does not combine with ep.

        Every problem is a ``UserError`` that names all the numbers and a setting that works.
        """
        given = ((f"distributed.pp={pp}, " if pp != 1 else "")
                 + f"distributed.dp_replicate={dp_replicate}, distributed.dp_shard={dp_shard}, "
                 + (f"distributed.cp={cp}, " if cp != 1 else "") + f"distributed.tp={tp}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        bad = [f"{name}={value}" for name, value in (("pp", pp), ("dp_replicate", dp_replicate), ("cp", cp), ("tp", tp))
               if not isinstance(value, int) or value < 1]
        if not isinstance(dp_shard, int) or (dp_shard < 1 and dp_shard != -1):
            bad.append(f"dp_shard={dp_shard}")
        if bad:
            raise UserError(
                f"Mesh sizes must be positive integers ({given}; bad: {', '.join(bad)}).",
                "Use 1 or more for each; dp_shard=-1 means 'all remaining processes'.",
            )
        fixed = pp * dp_replicate * cp * tp
        named = [(n, v) for n, v in (("pp", pp), ("dp_replicate", dp_replicate), ("cp", cp), ("tp", tp))
                 if n in ("dp_replicate", "tp") or v != 1]
        fixed_names = " x ".join(n for n, _ in named)
        fixed_values = " x ".join(str(v) for _, v in named)
        all_names = fixed_names.replace("dp_replicate", "dp_replicate x dp_shard")
        if dp_shard == -1:
            if world_size % fixed:
                raise UserError(
                    f"{given} does not fit {world_size} process(es): {fixed_names} = "
                    f"{fixed_values} = {fixed} does not divide {world_size}.",
                    f"Choose {fixed_names.replace(' x ', ', ')} whose product divides {world_size} "
                    f"(e.g. {_suggest(world_size, tp, cp, pp)}), or change the number of processes.",
                )
            dp_shard = world_size // fixed
        elif fixed * dp_shard != world_size:
            raise UserError(
                f"{given} multiply to {fixed * dp_shard} processes, but the run has "
                f"{world_size}.",
                f"Make {all_names} equal {world_size} (e.g. set "
                f"distributed.dp_shard=-1 to use the rest: {_suggest(world_size, tp, cp, pp)}), or "
                f"launch {fixed * dp_shard} processes.",
            )
        if pp > 1 and (cp > 1 or ep > 1):
            other = ", ".join(f"{n}={v}" for n, v in (("cp", cp), ("ep", ep)) if v > 1)
            raise UserError(
                f"distributed.pp={pp} (pipeline parallelism) does not combine with distributed.{other} yet "
                f"({given}, {world_size} process(es)): pipeline stages compose with data parallelism "
                "(dp_replicate, dp_shard) and tensor parallelism (tp).",
                f"Set distributed.pp=1 to use {other}, or set {other.replace('=', '=1 instead of ')} and "
                "split the model into pipeline stages over data-parallel groups.",
            )
        if ep > 1 and cp > 1:
            raise UserError(
                f"distributed.ep={ep} and distributed.cp={cp} cannot be combined ({given}, {world_size} "
                "process(es)): expert parallelism does not run under context parallelism.",
                "Set distributed.cp=1 for expert parallelism, or distributed.ep=1 to split sequences.",
            )
        if not isinstance(ep, int) or ep < 1 or dp_shard % ep:
            divisors = [d for d in range(1, dp_shard + 1) if dp_shard % d == 0]
            raise UserError(
                f"distributed.ep={ep} must be a positive integer dividing dp_shard={dp_shard} ({given}, "
                f"{world_size} process(es)): expert-parallel groups are made of dp_shard ranks.",
                f"Choose distributed.ep from {', '.join(map(str, divisors))} (it must also divide the model's "
                f"number of experts), or launch more processes.",
            )
        return cls(dp_replicate=dp_replicate, dp_shard=dp_shard, tp=tp, ep=ep, cp=cp, pp=pp)


def _suggest(world_size: int, tp: int, cp: int = 1, pp: int = 1) -> str:
    t = tp if tp >= 1 and world_size % tp == 0 else 1
    c = cp if cp >= 1 and (world_size // t) % cp == 0 else 1
    p = pp if pp >= 1 and (world_size // t // c) % pp == 0 else 1
    context = f", cp={c}" if cp != 1 else ""
    pipeline = f"pp={p}, " if pp != 1 else ""
    return f"{pipeline}dp_replicate=1, dp_shard={world_size // t // c // p}{context}, tp={t}"


def build_mesh(shape: MeshShape, device_type: str) -> Any:
    """The 4-D ``DeviceMesh`` for ``shape`` (collective: every rank calls it), or None for one
    process. Also builds the flattened data-parallel mesh that ``dp_mesh`` returns, and with
    cp > 1 the flattened "dp_shard_cp" dimension FSDP shards over."""
    if shape.world_size == 1:
        return None
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs an initialised process group (call init_distributed)")
    if dist.get_world_size() != shape.world_size:
        raise UserError(
            f"The mesh {shape.describe()} does not match the {dist.get_world_size()} launched "
            f"process(es).",
            "Resolve the shape with MeshShape.resolve(..., world_size=<launched processes>).",
        )
    sizes = (shape.dp_replicate, shape.dp_shard, shape.cp, shape.tp)
    if shape.pp > 1:
        # Pipeline stages outermost: this rank's 4-D mesh is its stage's slice of the root mesh;
        # every group below is built for every slice (group creation is collective).
        root = init_device_mesh(device_type, (shape.pp, *sizes), mesh_dim_names=(PP, *DIM_NAMES))
        mesh = root[DIM_NAMES]
        _PIPELINES[id(mesh)] = (mesh, root[PP], root.mesh, root)
    else:
        mesh = init_device_mesh(device_type, sizes, mesh_dim_names=DIM_NAMES)
    if shape.cp > 1:  # FSDP shards over dp_shard x cp: a dimension of the same root mesh as tp
        (root if shape.pp > 1 else mesh)["dp_shard", "cp"]._flatten(SHARD_CP)
    _build_dp_mesh(mesh)
    return mesh


#: Name of the pipeline dimension of the root mesh (pp > 1).
PP = "pp"


def _all_ranks(mesh: Any) -> Any:
    """[pp, dp_replicate, dp_shard, cp, tp] global ranks of the whole job (pp = 1 without
    pipeline parallelism), for building groups every rank must create alike."""
    pipeline = _PIPELINES.get(id(mesh))
    if pipeline is not None and pipeline[0] is mesh:
        return pipeline[2]
    return mesh.mesh.unsqueeze(0)


def pp_size(mesh: Any) -> int:
    """Pipeline stages' rank groups (1 without pipeline parallelism)."""
    pipeline = _PIPELINES.get(id(mesh)) if mesh is not None else None
    return pipeline[1].size() if pipeline is not None and pipeline[0] is mesh else 1


def pp_rank(mesh: Any) -> int:
    """This rank's place in its pipeline (the stage it runs with one stage per rank)."""
    return pp_group_mesh(mesh).get_local_rank() if pp_size(mesh) > 1 else 0


def pp_group_mesh(mesh: Any) -> Any:
    """The 1-D "pp" mesh of this rank's pipeline (None without pipeline parallelism)."""
    return _PIPELINES[id(mesh)][1] if pp_size(mesh) > 1 else None


#: Name of the flattened (dp_shard, cp) dimension FSDP shards over when cp > 1.
SHARD_CP = "dp_shard_cp"


def _build_dp_mesh(mesh: Any) -> Any:
    """Create one process group per (cp, tp) coordinate spanning (dp_replicate, dp_shard): a
    flattened "dp" mesh built with public APIs (``new_subgroups_by_enumeration`` +
    ``from_group``); with cp > 1 also one group per tp coordinate spanning dp x cp."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    ranks = _all_ranks(mesh)  # [pp, dp_replicate, dp_shard, cp, tp] tensor of global ranks
    pps, _, _, cps, tps = ranks.shape
    groups = [ranks[p, :, :, c, t].flatten().tolist() for p in range(pps) for c in range(cps) for t in range(tps)]
    mine, _ = dist.new_subgroups_by_enumeration(groups)
    dp = DeviceMesh.from_group(mine, mesh.device_type, mesh_dim_names=("dp",))
    with_cp = mine
    if cps > 1:
        with_cp, _ = dist.new_subgroups_by_enumeration(
            [ranks[p, ..., t].flatten().tolist() for p in range(pps) for t in range(tps)])
    _DP_MESHES[id(mesh)] = (mesh, dp, with_cp)
    return dp


def forget_groups() -> None:
    """Drop the cached dp/cp/ep meshes and process groups (called when the process group is
    destroyed): the cache would keep them, and their gloo worker threads, alive, and a later
    mesh in the same process could be given a dead mesh's groups by a reused ``id()``."""
    _DP_MESHES.clear()
    _EP_GROUPS.clear()
    _PIPELINES.clear()


def expert_groups(mesh: Any, ep: int) -> tuple[Any, Any]:
    """(the 1-D "ep" ``DeviceMesh`` of this rank's expert-parallel group, the process group of its
    replica group, or None where no other rank holds the same experts). Collective the first time
    for a mesh: every rank calls it. ep groups are ``ep`` neighbouring dp_shard ranks with the
    same dp_replicate and tp coordinates; a replica group is every rank with the same tp
    coordinate and the same place in its ep group."""
    cached = _EP_GROUPS.get((id(mesh), ep))
    if cached is not None:
        return cached
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    ranks = mesh.mesh[:, :, 0]  # [dp_replicate, dp_shard, tp] (MeshShape refuses ep with cp > 1)
    replicate, shard, tp = ranks.shape
    if shard % ep:
        raise ValueError(f"ep={ep} does not divide dp_shard={shard}")
    blocks = ranks.reshape(replicate, shard // ep, ep, tp)
    ep_ranks = [blocks[r, g, :, t].tolist() for t in range(tp) for r in range(replicate) for g in range(shard // ep)]
    replica_ranks = [blocks[:, :, i, t].flatten().tolist() for t in range(tp) for i in range(ep)]
    mine, _ = dist.new_subgroups_by_enumeration(ep_ranks)
    ep_mesh = DeviceMesh.from_group(mine, mesh.device_type, mesh_dim_names=("ep",))
    replica = None
    if len(replica_ranks[0]) > 1:
        replica, _ = dist.new_subgroups_by_enumeration(replica_ranks)
    _EP_GROUPS[(id(mesh), ep)] = (ep_mesh, replica)
    return ep_mesh, replica


def check_ep(config: dict[str, Any], ep: int, where: str = "the model") -> int | None:
    """Refuse ``distributed.ep=ep`` for a model whose config (a dict, e.g. config.json's) it does
    not fit: ep > 1 needs a mixture-of-experts model whose number of experts ep divides. Pure
    (no torch, no process group), so a check before launch can call it. Returns the number of
    experts (None: not a mixture of experts)."""
    count = num_experts(config)
    if ep == 1:
        return count
    if count is None:
        raise UserError(
            f"distributed.ep={ep} splits the experts of a mixture-of-experts model over {ep} processes, but "
            f"{where} ({config.get('model_type', 'unknown type')}) has no experts.",
            "Set distributed.ep=1 (the default) for a dense model.")
    if count % ep:
        divisors = [d for d in range(1, count + 1) if count % d == 0]
        raise UserError(
            f"distributed.ep={ep} must divide the number of experts, but {where} has {count}.",
            f"Choose distributed.ep from {', '.join(map(str, divisors))} (it must also divide distributed.dp_shard).")
    return count


def _size(mesh: Any, name: str) -> int:
    return mesh.size(DIM_NAMES.index(name))


def dp_world_size(mesh: Any) -> int:
    """Number of data-parallel groups (distinct data streams): dp_replicate x dp_shard."""
    if mesh is None:
        return 1
    return _size(mesh, "dp_replicate") * _size(mesh, "dp_shard")


def dp_rank(mesh: Any) -> int:
    """This rank's data-parallel index in ``range(dp_world_size(mesh))``; tp peers share it."""
    if mesh is None:
        return 0
    return (mesh.get_local_rank("dp_replicate") * _size(mesh, "dp_shard")
            + mesh.get_local_rank("dp_shard"))


def tp_size(mesh: Any) -> int:
    return 1 if mesh is None else _size(mesh, "tp")


def cp_size(mesh: Any) -> int:
    """Context-parallel degree: ranks that split the tokens of the same samples."""
    return 1 if mesh is None else _size(mesh, "cp")


def cp_rank(mesh: Any) -> int:
    """This rank's place in its context-parallel group (0 without one)."""
    return 0 if cp_size(mesh) == 1 else mesh.get_local_rank("cp")


def cp_group(mesh: Any) -> Any:
    """Process group of this rank's context-parallel peers (None without context parallelism)."""
    return mesh["cp"].get_group() if cp_size(mesh) > 1 else None


def tp_mesh(mesh: Any) -> Any:
    """The 1-D tensor-parallel sub-mesh, or None when there is no tensor parallelism."""
    return mesh["tp"] if tp_size(mesh) > 1 else None


def fsdp_mesh(mesh: Any) -> Any:
    """The mesh ``fully_shard`` gets: 1-D ``dp_shard`` (FSDP), 2-D ``(dp_replicate, dp_shard)``
    (HSDP: shard inside, replicate across), or None when there is one data-parallel rank and no
    context parallelism. With cp > 1 the shard dimension is the flattened ``dp_shard x cp``: cp
    peers train the same weights on different tokens, and FSDP's sum reduction adds their
    gradients."""
    if mesh is None or dp_world_size(mesh) * cp_size(mesh) == 1:
        return None
    shard = SHARD_CP if cp_size(mesh) > 1 else "dp_shard"
    # A flattened dimension lives on the root mesh: with pipeline stages, slice it from there
    # (the slice holds this rank's stage, as the stage's own mesh does).
    pipeline = _PIPELINES.get(id(mesh))
    source = pipeline[3] if shard == SHARD_CP and pipeline is not None and pipeline[0] is mesh else mesh
    if _size(mesh, "dp_replicate") > 1:
        return source["dp_replicate", shard]
    return source[shard]


def dp_mesh(mesh: Any) -> Any:
    """The flattened 1-D "dp" mesh (all dp_replicate x dp_shard ranks with this rank's tp
    coordinate), or None without a mesh. Sum label-token counts and losses over its group."""
    if mesh is None:
        return None
    cached = _DP_MESHES.get(id(mesh))
    if cached is not None and cached[0] is mesh:
        return cached[1]
    raise RuntimeError("dp_mesh() needs a mesh made by build_mesh()")


def dp_group(mesh: Any) -> Any:
    """Process group of ``dp_mesh(mesh)`` (None without a mesh)."""
    dp = dp_mesh(mesh)
    return None if dp is None else dp.get_group()


def all_reduce_dp(tensor: Any, mesh: Any) -> Any:
    """Sum ``tensor`` in place over the data-parallel ranks (no-op without a mesh); returns it.
    For values every cp rank holds whole (a sample count); a loss is ``all_reduce_loss``'s."""
    if mesh is None or dp_world_size(mesh) == 1:
        return tensor
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=dp_group(mesh))
    return tensor


def all_reduce_loss(tensor: Any, mesh: Any) -> Any:
    """Sum per-rank losses (or anything a cp rank holds a part of) in place over dp x cp; returns
    it. Equals ``all_reduce_dp`` without context parallelism."""
    if cp_size(mesh) == 1:
        return all_reduce_dp(tensor, mesh)
    import torch.distributed as dist

    dp_mesh(mesh)  # checks the mesh came from build_mesh
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=_DP_MESHES[id(mesh)][2])
    return tensor
