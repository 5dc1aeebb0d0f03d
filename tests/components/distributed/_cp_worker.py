"""Multi-process worker for the context-parallel tests (launched by torchrun).

    torchrun --standalone --nproc-per-node CP _cp_worker.py OUT.json CASE [CASE ...]

Every case builds the same tiny model on every rank and one collated batch; each rank runs its
zig-zag shard (``shard_batch``) through the model with the ``"automodel_cp"`` attention, computes
its loss (CE of its tokens / trained tokens of the whole batch), backpropagates, and the loss and
every gradient are summed over the ranks. Rank 0 compares them with the same model run on the
whole batch in one process with transformers' own sdpa attention, and writes the errors.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from _dist_worker import finish, make_model

from automodel_cli.components.data.collate import SFTCollator
from automodel_cli.components.data.packing import pack_sequences
from automodel_cli.components.distributed import context_parallel as cp
from automodel_cli.components.distributed.env import init_distributed
from automodel_cli.components.loss.masked_ce import masked_cross_entropy
from automodel_cli.components.training.memory import enable_activation_checkpointing

VOCAB = 128
# name -> (architecture, packed, activation checkpointing)
CASES = {
    "llama": ("llama", False, False),
    "llama_packed": ("llama", True, False),
    "qwen3": ("qwen3", False, False),
    "qwen3_packed": ("qwen3", True, False),
    "llama_packed_ac": ("llama", True, True),
}


def make_batch(packed: bool, cp_size: int) -> dict:
    """Documents of uneven lengths with prompt tokens (-100 labels): packed into rows whose
    documents cross chunk boundaries, or padded rows with an attention mask."""
    generator = torch.Generator().manual_seed(7)
    lengths = [5, 11, 9, 7, 3, 13] if packed else [13, 16, 7]
    ids = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]
    labels = [[-100] * (i % 3) + row[i % 3:] for i, row in enumerate(ids)]
    collate = SFTCollator(pad_token_id=0, packed=packed, pad_to_multiple_of=2 * cp_size * 4)
    if packed:
        return collate(pack_sequences(ids, labels, max_length=16))
    return collate([{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels)])


def reference(model, batch: dict) -> tuple[float, dict, torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_label_tokens")}
    logits = model(**inputs, use_cache=False).logits
    loss = masked_cross_entropy(logits, batch["labels"], batch["num_label_tokens"])
    loss.backward()
    return float(loss), {n: p.grad for n, p in model.named_parameters()}, logits.detach()


def counting_attention(calls: list) -> None:
    """Re-register "automodel_cp" so each call is counted (a recompute under activation
    checkpointing calls it again in the backward, with the shard it got from the forward)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def counted(*args, **kwargs):
        calls.append(1)
        return cp.context_parallel_attention(*args, **kwargs)

    ALL_ATTENTION_FUNCTIONS.register(cp.ATTENTION, counted)


def context_parallel(model, batch: dict, cp_size: int, rank: int) -> tuple[float, dict, torch.Tensor, dict]:
    calls: list = []
    counting_attention(calls)
    shard = cp.shard_batch(batch, cp_size, rank, group=dist.group.WORLD)
    targets, tokens = shard.pop("targets"), shard.pop("num_label_tokens")
    logits = model(**shard, use_cache=False).logits
    loss = masked_cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), tokens)
    loss.backward()
    facts = {"attention_calls": len(calls)}
    full_logits = cp.gather_sequence(logits.detach(), shard["cp_shard"])
    summed = loss.detach().clone()
    dist.all_reduce(summed)
    local_tokens = cp.local_label_tokens(targets)
    dist.all_reduce(local_tokens)
    grads = {}
    for name, param in model.named_parameters():
        grad = torch.zeros_like(param) if param.grad is None else param.grad.clone()  # none: reported as wrong
        dist.all_reduce(grad)
        grads[name] = grad
    facts |= {"tokens_summed": int(local_tokens), "tokens_batch": int(tokens),
             "local_tokens": shard["input_ids"].shape[1], "position_ids_rank": shard["position_ids"].tolist()}
    return float(summed), grads, full_logits, facts


def run(name: str, env) -> dict:
    arch, packed, ac = CASES[name]
    torch.manual_seed(0)  # identical weights on every rank
    model = make_model(arch)
    model.set_attn_implementation("sdpa")
    single = copy.deepcopy(model)
    cp.use_context_parallel_attention(model)
    model.train()
    single.train()
    if ac:
        enable_activation_checkpointing(model, "full")
    batch = make_batch(packed, env.world_size)
    loss, grads, logits, facts = context_parallel(model, batch, env.world_size, env.rank)
    ref_loss, ref_grads, ref_logits = reference(single, batch)
    if not env.is_main:
        return {}
    real = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()  # padded queries differ
    errors = {n: float((grads[n] - g).abs().max() / g.abs().max().clamp(min=1e-30)) for n, g in ref_grads.items()}
    return {"loss": loss, "ref_loss": ref_loss, "grad_rel_errors": errors,
            "logits_rel_error": float((logits - ref_logits)[real].abs().max() / ref_logits[real].abs().max()),
            "checkpointing": bool(model.is_activation_checkpointing),
            "seq_len": batch["input_ids"].shape[1], **facts}


def main() -> None:
    out, names = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    env = init_distributed()
    finish(env, out, {name: run(name, env) for name in names})


if __name__ == "__main__":
    main()
