"""A tiny FSDP2 training job for the multi-rank checkpoint tests (launched by torchrun).

    torchrun --standalone --nproc-per-node N dist_worker.py train  RUN_DIR OUT.json
    torchrun --standalone --nproc-per-node N dist_worker.py resume RUN_DIR OUT.json
    torchrun --standalone --nproc-per-node 2 dist_worker.py recover RUN_DIR OUT.json
    torchrun --standalone --nproc-per-node 2 dist_worker.py background RUN_DIR OUT.json
    torchrun --standalone --nproc-per-node 1 dist_worker.py cuda   RUN_DIR OUT.json   (NCCL, GPU)

``cuda`` saves from a CUDA FSDP2 model and loads into a fresh one in the same job (exact
state and CUDA RNG), for the GPU test. ``recover`` saves two checkpoints, then: a full disk on
rank 1 during a third save (every rank must raise the same UserError); damage only rank 1
can see (a flipped byte in its own shard of the latest checkpoint: every rank must fall back to
the older one); both damaged (every rank must raise the same UserError). ``background``
saves in the background at step SAVE_AT while training goes on (the checkpoint must hold the
state of step SAVE_AT exactly), then saves again while a file-size limit on rank 1 only makes
its background write fail (every rank must raise the same UserError when finishing). ``train`` runs SAVE_AT steps, saves a checkpoint, writes the full (gathered) model and
optimizer state to RUN_DIR/reference.pt, then runs two more steps and records their losses
and the random numbers each rank draws right after the save. ``resume`` builds the model from
a different seed, loads the checkpoint on its own world size, compares the gathered state
with reference.pt bit for bit, and runs the same two steps. The global batch is the same for
every world size (split evenly over ranks), so the losses must agree.

Sharding is plain ``fully_shard`` per decoder layer plus the root (the project's parallelize
code lives elsewhere).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

GLOBAL_BATCH = 4
SEQ = 16
VOCAB = 128
SAVE_AT = 2
MORE = 2


DEVICE = "cpu"


def build(seed: int, mesh):
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(DEVICE)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    return model, optimizer, scheduler


def batch(step: int) -> torch.Tensor:
    """This rank's slice of the global batch of ``step`` (the same data for any world size)."""
    data = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(100 + step))
    world, rank = dist.get_world_size(), dist.get_rank()
    per = GLOBAL_BATCH // world
    return data[rank * per:(rank + 1) * per].to(DEVICE)


def train_step(model, optimizer, scheduler, step: int) -> float:
    ids = batch(step)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    value = loss.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.AVG)
    return float(value)


def full_state(model, optimizer) -> dict[str, torch.Tensor]:
    """Gathered model and optimizer state (every rank gets all of it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, flatten_optimizer_state_dict=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    out = {f"model.{k}": v.detach().clone() for k, v in model_sd.items()}
    out.update({f"optim.{k}": v.detach().clone() for k, v in optim_sd.items() if isinstance(v, torch.Tensor)})
    return out


def failing_save(run_dir: Path, model, optimizer, scheduler) -> str:
    """A save in which rank 1 fails after the shards are written: every rank must raise (no
    hang), and nothing may be published."""
    from automodel_cli.components.checkpoint import save as save_module

    real = save_module.capture_rng_state

    def broken(generators=None):
        raise OSError("disk full (simulated on rank 1)")

    if dist.get_rank() == 1:
        save_module.capture_rng_state = broken
    try:
        save_module.save_checkpoint(run_dir, 1, model=model, optimizer=optimizer, scheduler=scheduler,
                                    train_state={}, keep=2)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        save_module.capture_rng_state = real
    return "no error"


def recover(run_dir: Path, mesh) -> dict:
    """Disk errors and damaged checkpoints, decided alike on every rank (see the module doc)."""
    import errno

    from automodel_cli.components.checkpoint import load_checkpoint, save_checkpoint
    from automodel_cli.components.checkpoint import save as save_module
    from automodel_cli.components.checkpoint.load import find_intact_checkpoint
    from automodel_cli.errors import UserError

    rank = dist.get_rank()
    model, optimizer, scheduler = build(0, mesh)
    result: dict = {}

    def save(step: int) -> None:
        save_checkpoint(run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler, train_state={},
                        keep=3)

    for step in (1, 2):
        train_step(model, optimizer, scheduler, step)
        save(step)

    def full_disk(generators=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(run_dir / "rng" / "rank_1.pt"))

    real = save_module.capture_rng_state
    if rank == 1:
        save_module.capture_rng_state = full_disk
    try:
        save(3)
        result["disk"] = "no error"
    except Exception as exc:
        result["disk"] = f"{type(exc).__name__}: {exc}"
    finally:
        save_module.capture_rng_state = real
    dist.barrier()  # rank 0 removes the unfinished checkpoint before it raises
    result["entries"] = sorted(p.name for p in (run_dir / "checkpoints").iterdir())

    def flip(relative: str) -> None:
        dist.barrier()
        if rank == 0:
            path = run_dir / "checkpoints" / relative
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
        dist.barrier()

    flip("step_00000002/model/__1_0.distcp")  # same size: only rank 1 (which hashes it) can tell
    notes: list[str] = []
    chosen = find_intact_checkpoint(run_dir, note=notes.append)
    result["chosen"], result["notes"] = chosen.name, notes
    result["loaded_step"] = load_checkpoint(chosen, model=model, optimizer=optimizer, scheduler=scheduler,
                                            verify=False)["step"]
    flip("step_00000001/optim/__1_0.distcp")
    try:
        find_intact_checkpoint(run_dir)
        result["none_intact"] = "no error"
    except UserError as exc:
        result["none_intact"] = exc.message
    return result


def background(run_dir: Path, mesh) -> dict:
    """Background saves on two ranks (see the module doc)."""
    import resource

    from automodel_cli.components.checkpoint import find_checkpoint, load_checkpoint
    from automodel_cli.components.checkpoint.save import start_checkpoint

    model, optimizer, scheduler = build(0, mesh)
    for step in range(SAVE_AT):
        train_step(model, optimizer, scheduler, step)
    reference = full_state(model, optimizer)

    def start(step: int):
        return start_checkpoint(run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                train_state={"epoch": 0}, keep=3, background=True)

    pending = start(SAVE_AT)
    result: dict = {"next": []}
    while True:  # train on (FSDP collectives on the default group) until every rank's writes are done
        result["next"].append(train_step(model, optimizer, scheduler, SAVE_AT + len(result["next"])))
        if pending.ready():
            break
    result["published"] = pending.finish().name
    fresh, fresh_optimizer, fresh_scheduler = build(1, mesh)
    load_checkpoint(find_checkpoint("auto", run_dir), model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    mine = full_state(fresh, fresh_optimizer)
    result["state_mismatches"] = sorted(k for k in reference if not torch.equal(mine[k], reference[k]))

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if dist.get_rank() == 1:  # rank 1's shards (> 100 KB) exceed it; its RNG file does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, hard))
    try:
        refused = start(SAVE_AT + 10)
        train_step(model, optimizer, scheduler, SAVE_AT + 10)
        refused.finish()
        result["refused"] = "no error"
    except Exception as exc:
        result["refused"] = f"{type(exc).__name__}: {exc}"
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    dist.barrier()
    result["entries"] = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    return result


def lora(run_dir: Path, mesh) -> None:
    """LoRA on an FSDP2-sharded model: only the adapter is saved; logits for the tests."""
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from automodel_cli.components.checkpoint import save_checkpoint

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    if dist.get_rank() == 0:
        base.save_pretrained(run_dir / "base_model")
    torch.manual_seed(5)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    for step in range(2):
        train_step(model, optimizer, scheduler, step)
    save_checkpoint(run_dir, 2, model=model, optimizer=optimizer, scheduler=scheduler, train_state={}, keep=1)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if dist.get_rank() == 0:
        torch.save({"ids": ids, "logits": logits}, run_dir / "reference_logits.pt")


def main() -> None:
    global DEVICE
    mode, run_dir, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if mode == "cuda":
        DEVICE = "cuda"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo")
    from torch.distributed.device_mesh import init_device_mesh

    from automodel_cli.components.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(DEVICE, (world,), mesh_dim_names=("dp_shard",))
    data_order = torch.Generator().manual_seed(7)
    result: dict = {"world": world}
    if mode == "recover":
        result.update(recover(run_dir, mesh))
    elif mode == "background":
        result.update(background(run_dir, mesh))
    elif mode == "train":
        model, optimizer, scheduler = build(0, mesh)
        result["losses"] = [train_step(model, optimizer, scheduler, 0)]
        result["failed_save"] = failing_save(run_dir, model, optimizer, scheduler)
        result["losses"].append(train_step(model, optimizer, scheduler, 1))
        torch.manual_seed(1000 + rank)  # per-rank RNG state, as dropout would leave it
        torch.randperm(10, generator=data_order)
        save_checkpoint(run_dir, SAVE_AT, model=model, optimizer=optimizer, scheduler=scheduler,
                        train_state={"epoch": 0}, keep=2, generators={"data": data_order})
        result["after_save"] = {"torch": torch.rand(1).item(), "data": torch.rand(1, generator=data_order).item()}
        reference = full_state(model, optimizer)
        if rank == 0:
            torch.save(reference, run_dir / "reference.pt")
        result["next"] = [train_step(model, optimizer, scheduler, s) for s in range(SAVE_AT, SAVE_AT + MORE)]
        lora(run_dir / "lora_run", mesh)
    elif mode == "cuda":
        model, optimizer, scheduler = build(0, mesh)
        result["losses"] = [train_step(model, optimizer, scheduler, s) for s in range(SAVE_AT)]
        torch.cuda.manual_seed(1000 + rank)
        save_checkpoint(run_dir, SAVE_AT, model=model, optimizer=optimizer, scheduler=scheduler,
                        train_state={"epoch": 0}, keep=2)
        result["after_save"] = torch.rand(1, device="cuda").item()
        reference = {k: v.cpu() for k, v in full_state(model, optimizer).items()}
        if rank == 0:
            torch.save(reference, run_dir / "reference.pt")
        result["next"] = [train_step(model, optimizer, scheduler, s) for s in range(SAVE_AT, SAVE_AT + MORE)]
        fresh, fresh_optimizer, fresh_scheduler = build(1, mesh)
        torch.cuda.manual_seed(7)
        load_checkpoint(find_checkpoint("auto", run_dir), model=fresh, optimizer=fresh_optimizer,
                        scheduler=fresh_scheduler)
        result["after_load"] = torch.rand(1, device="cuda").item()
        mine = {k: v.cpu() for k, v in full_state(fresh, fresh_optimizer).items()}
        result["state_mismatches"] = sorted(k for k in reference if not torch.equal(mine.get(k), reference[k]))
        result["resumed_next"] = [train_step(fresh, fresh_optimizer, fresh_scheduler, s)
                                  for s in range(SAVE_AT, SAVE_AT + MORE)]
    else:
        model, optimizer, scheduler = build(1, mesh)
        path = find_checkpoint("auto", run_dir)
        state = load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler,
                                generators={"data": data_order})
        result["after_load"] = {"torch": torch.rand(1).item(), "data": torch.rand(1, generator=data_order).item()}
        result["train_state"] = state
        result["scheduler_epoch"] = scheduler.last_epoch
        reference = torch.load(run_dir / "reference.pt", weights_only=True)
        mine = full_state(model, optimizer)
        result["state_keys_equal"] = sorted(mine) == sorted(reference)
        result["state_mismatches"] = sorted(k for k in reference if k in mine and not torch.equal(mine[k], reference[k]))
        result["next"] = [train_step(model, optimizer, scheduler, s) for s in range(SAVE_AT, SAVE_AT + MORE)]
    per_rank = [None] * world
    dist.all_gather_object(per_rank, result)
    if rank == 0:
        out.write_text(json.dumps(per_rank, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
    # Skip interpreter teardown: on a loaded machine, C++ static destructors of the gloo
    # backend occasionally abort ("terminate called without an active exception") after all
    # work is done, which would fail a test that passed. Everything is flushed at this point.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
