"""Process-group setup from the environment ``torchrun`` (or Slurm via torchrun) provides.

``init_distributed()`` is the first call of a distributed recipe. Under ``torchrun`` with
``WORLD_SIZE > 1`` it initialises the default process group: NCCL with the local CUDA device
selected when CUDA is available, gloo on CPU. Without those variables (or with one process) it
returns a single-process ``DistEnv`` and creates no process group, so the same recipe code runs
on a laptop unchanged.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from automodel_cli.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: global rank, rank on its node, process count, device, backend."""

    rank: int
    local_rank: int
    world_size: int
    device: Any  # torch.device; typed loosely so this module imports without torch
    backend: str | None = None  # "nccl" | "gloo" | None (single process, no process group)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, prints and writes shared files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"Environment variable {name}={value!r} is not an integer.",
                        "It is normally set by torchrun; unset it or launch with torchrun.") from None


def init_distributed(backend: str | None = None) -> DistEnv:
    """Initialise ``torch.distributed`` from torchrun's variables, or describe one process.

    ``backend`` overrides the choice (``"nccl"`` on CUDA, ``"gloo"`` otherwise). Calling it again
    in a process whose default group already exists returns the same description.
    """
    import torch
    import torch.distributed as dist

    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    cuda = torch.cuda.is_available()

    if world_size <= 1:
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        return DistEnv(rank=0, local_rank=0, world_size=1, device=device, backend=None)

    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise UserError(
                f"WORLD_SIZE={world_size} is set but {name} is not.",
                "Launch distributed runs with torchrun (or `automodel launch`), which sets both.",
            )
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} CUDA device(s).",
                "Start at most one process per GPU (torchrun --nproc-per-node).",
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = backend or ("nccl" if cuda else "gloo")
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "rank": rank, "world_size": world_size}
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device,
                   backend=dist.get_backend())


#: Set once this process has destroyed its process group (see ``exit_process``).
_DESTROYED = False


def destroy() -> None:
    """Tear the default process group down (a no-op when none exists) and drop our cached
    meshes and groups."""
    global _DESTROYED
    import torch.distributed as dist

    from automodel_cli.components.distributed.mesh import forget_groups

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _DESTROYED = True
    forget_groups()


def exit_process(code: int) -> None:
    """End a process whose process group ``destroy()`` tore down: run the ``atexit`` handlers
    (loggers, temporary directories), flush stdout/stderr, then ``os._exit(code)``.

    Why not a plain ``sys.exit``: ``destroy_process_group`` only unregisters the groups; a gloo
    group's worker threads live until its last Python reference goes, and references remain in
    torch's DTensor caches and in the model's FSDP state. Their teardown during interpreter
    shutdown can then abort a run that has finished and saved (SIGABRT, "terminate called without
    an active exception"; pytorch/pytorch#179291), which torchrun reports as a failed run. Every
    output was written and closed before ``destroy()``, so nothing is lost by skipping it.
    """
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def process_group_destroyed() -> bool:
    """Whether ``destroy()`` ended a process group in this process."""
    return _DESTROYED
