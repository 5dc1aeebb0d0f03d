"""Context parallelism: one sequence split over ``cp`` ranks, attention exact across the split.

``distributed.cp`` (docs/distributed.md, "Context parallelism") runs it in finetune and pretrain.

Supported here, proven against one process by ``tests/components/distributed/test_context_parallel.py``
(real torchrun + gloo, tiny Llama and Qwen3 with grouped-query attention, packed and unpacked):

* load-balanced zig-zag sharding: the sequence is cut into ``2 * cp`` chunks and rank ``r`` holds
  chunks ``r`` and ``2 * cp - 1 - r``, so every rank has the same amount of causal attention work
  (an early chunk attends to little, a late one to much; each rank gets one of each);
* ``shard_batch``: splits a collated batch (``SFTCollator``, packed or not) AFTER shifting the
  labels over the whole row, so the last token of a chunk keeps its true next-token target; the
  model gets the local tokens with their global ``position_ids`` (RoPE is exact) and a
  ``ContextParallelShard`` carrying the per-batch attention mask;
* the attention function ``"automodel_cp"`` (``use_context_parallel_attention(model)``): all-gathers
  the keys and values of the cp group (one differentiable collective per layer, as Llama 3's
  training did; the backward reduce-scatters the key/value gradients back), then runs SDPA with an
  explicit boolean mask built from GLOBAL token indices: causal, and a key visible only inside its
  own document for packed rows (document starts where ``position_ids`` stop counting up, the rule
  transformers itself uses). Any backend: gloo on CPU, NCCL on GPU.

Not supported (refused, never silently wrong): sliding-window layers, logit soft-capping,
attention biases (Gemma 2/3, Mistral-style windows), vision-language batches. Memory: each rank
holds the keys/values of the whole sequence for one layer at a time and a ``[B, T/cp, T]`` boolean
mask per batch; a ring exchange (torch's ``context_parallel``) would lower the former if needed.

How a run uses it (``components/distributed/mesh.py``, ``training/context_parallel.py``):

1. Mesh: a ``cp`` dimension between dp_shard and tp whose ranks read the same samples
   (``dp_rank`` excludes cp); FSDP shards over the flattened ``dp_shard x cp``, so the existing
   sum reduction adds the cp peers' gradients.
2. Data: every batch is padded to a multiple of ``2 * cp`` (``lcm(2 * cp, cp * tp)`` under
   sequence parallelism, whose tp ranks split each rank's ``T / cp`` tokens again), then
   ``shard_batch`` with the cp group.
3. Loss: ``training_loss(..., shifted=True)`` takes the shard's ``targets`` as they are; each
   rank normalises by the step's trained tokens counted once per sample, and the logged loss is
   summed over dp x cp (``mesh.all_reduce_loss``).
4. Model: ``use_context_parallel_attention`` before parallelising; validation switches back to
   sdpa on whole batches (``training/context_parallel.whole_sequences``).
5. Checks before launch (``components/launch/preflight.context_parallel_problems``): the recipe,
   vision-language models and data, ``unsupported_problem`` on config.json, and
   ``data.max_length`` for packed rows and pretrain blocks; ``MeshShape.resolve`` fits cp to the
   world size and refuses it with ep.
6. Memory plan: activations of ``T / cp`` tokens, plus every non-checkpointed layer's gathered
   keys and values (repeated to the query heads, kept for SDPA's backward) and the
   ``B * T * T / cp``-byte mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from automodel_cli.errors import UserError

#: Name under which the attention function is registered in transformers.
ATTENTION = "automodel_cp"
#: Batch keys ``shard_batch`` consumes or produces itself.
_HANDLED = ("input_ids", "labels", "position_ids", "attention_mask", "num_label_tokens")


def check_divisible(seq_len: int, cp_size: int) -> None:
    """UserError unless ``seq_len`` splits into ``2 * cp_size`` equal zig-zag chunks."""
    if cp_size < 1:
        raise ValueError(f"cp_size must be >= 1, got {cp_size}")
    if seq_len % (2 * cp_size):
        multiple = 2 * cp_size
        raise UserError(
            f"Context parallelism cp={cp_size} cuts each sequence into {multiple} chunks, but the batch's "
            f"sequence length {seq_len} is not a multiple of {multiple}.",
            f"Pad every batch to a multiple of {multiple} (the next one is {-(-seq_len // multiple) * multiple}).",
        )


def zigzag_indices(seq_len: int, cp_size: int, cp_rank: int, device: Any = None) -> Any:
    """Global token indices held by ``cp_rank``: chunks ``cp_rank`` and ``2*cp_size-1-cp_rank``
    of ``2 * cp_size`` equal chunks, in that order."""
    import torch

    check_divisible(seq_len, cp_size)
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be in [0, {cp_size}), got {cp_rank}")
    chunk = seq_len // (2 * cp_size)
    head = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    tail_start = (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([head, torch.arange(tail_start, tail_start + chunk, device=device)])


def gathered_indices(seq_len: int, cp_size: int, device: Any = None) -> Any:
    """Global indices of the tokens in the order an all-gather over the cp group concatenates
    them (rank 0's shard, then rank 1's, ...)."""
    import torch

    return torch.cat([zigzag_indices(seq_len, cp_size, rank, device) for rank in range(cp_size)])


def zigzag_split(tensor: Any, cp_size: int, cp_rank: int, dim: int = 1) -> Any:
    """This rank's zig-zag shard of ``tensor`` along ``dim`` (the sequence dimension)."""
    return tensor.index_select(dim, zigzag_indices(tensor.size(dim), cp_size, cp_rank, tensor.device))


def zigzag_unsplit(parts: list[Any], dim: int = 1) -> Any:
    """The whole sequence back from every rank's shard (``parts`` in rank order): the inverse of
    ``zigzag_split``."""
    import torch

    gathered = torch.cat(list(parts), dim=dim)
    order = gathered_indices(gathered.size(dim), len(parts), gathered.device)
    return gathered.index_select(dim, torch.argsort(order))


@dataclass(frozen=True)
class ContextParallelShard:
    """What the attention of every layer needs for one batch on one rank.

    ``mask`` is ``[B, 1, T/cp, T]`` boolean, True where a local query may attend to a key of the
    gathered sequence (keys in all-gather order); ``group`` the cp process group (None: one rank)."""

    cp_size: int
    cp_rank: int
    group: Any
    mask: Any

    def gather(self, tensor: Any, dim: int) -> Any:
        """All-gather ``tensor`` over the cp group along ``dim``, differentiably (the backward
        sums the gradients of every rank's use and hands each rank its own slice)."""
        if self.cp_size == 1:
            return tensor
        if self.group is None:
            raise RuntimeError(f"cp_size={self.cp_size} needs the cp process group to gather keys and values")
        from torch.distributed._functional_collectives import all_gather_single

        return all_gather_single(tensor.contiguous(), dim, self.group)


def shard_batch(batch: dict[str, Any], cp_size: int, cp_rank: int, group: Any = None) -> dict[str, Any]:
    """This rank's part of a collated batch (``SFTCollator``'s keys), for ``model(**inputs)``
    plus the loss.

    Returns ``input_ids`` and ``position_ids`` (global positions: the row's own, or ``0..T-1``)
    of the local tokens, ``targets`` (the labels shifted over the WHOLE row, then split: position
    ``t`` must predict ``targets[t]``, do not shift again), ``cp_shard`` (pass it to the model as a
    keyword) and ``num_label_tokens`` unchanged when present (it counts the whole sequence, i.e.
    the cp group's total). ``attention_mask`` (padding) becomes part of the mask. Other ``[B, T]``
    tensors are split; anything else is refused (image tensors cannot be cut by position).
    """
    import torch
    from transformers.masking_utils import find_packed_sequence_indices

    from automodel_cli.components.loss.targets import shift_labels

    input_ids = batch["input_ids"]
    rows, seq_len = input_ids.shape
    check_divisible(seq_len, cp_size)
    device = input_ids.device
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(seq_len, device=device).expand(rows, seq_len)
    documents = find_packed_sequence_indices(position_ids)
    if documents is None:
        documents = torch.zeros_like(position_ids)
    attention_mask = batch.get("attention_mask")
    keep = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
            else attention_mask.to(torch.bool))

    local = zigzag_indices(seq_len, cp_size, cp_rank, device)
    keys = gathered_indices(seq_len, cp_size, device)
    causal = keys[None, :] <= local[:, None]
    same_document = documents[:, local, None] == documents[:, None, keys]
    # A padded query whose every key is padding would make softmax NaN: it sees itself (no label).
    visible = keep[:, None, keys] | (keys[None, :] == local[:, None])
    mask = (causal & same_document & visible).unsqueeze(1)

    out: dict[str, Any] = {
        "input_ids": input_ids.index_select(1, local),
        "position_ids": position_ids.index_select(1, local),
        "cp_shard": ContextParallelShard(cp_size, cp_rank, group, mask),
    }
    if "labels" in batch:
        out["targets"] = shift_labels(batch["labels"]).index_select(1, local.to(batch["labels"].device))
    if "num_label_tokens" in batch:
        out["num_label_tokens"] = batch["num_label_tokens"]
    for key, value in batch.items():
        if key in _HANDLED:
            continue
        if not (isinstance(value, torch.Tensor) and tuple(value.shape[:2]) == (rows, seq_len)):
            raise ValueError(f"context parallelism cannot split batch key {key!r} (not a [batch, seq] tensor)")
        out[key] = value.index_select(1, local.to(value.device))
    return out


def local_label_tokens(targets: Any) -> Any:
    """Trained tokens of this rank's ``targets``; summed over the cp group it equals the whole
    sequence's count (``SFTCollator``'s ``num_label_tokens``)."""
    from automodel_cli.components.loss.targets import IGNORE_INDEX

    return (targets != IGNORE_INDEX).sum()


def gather_sequence(tensor: Any, shard: ContextParallelShard, dim: int = 1) -> Any:
    """The whole sequence of a per-token tensor (logits, hidden states) in original token order:
    all-gathered over the cp group and un-zig-zagged. Differentiable."""
    import torch

    gathered = shard.gather(tensor, dim)
    order = gathered_indices(gathered.size(dim), shard.cp_size, gathered.device)
    return gathered.index_select(dim, torch.argsort(order))


def attend(query: Any, key: Any, value: Any, mask: Any, scaling: float | None = None, dropout: float = 0.0) -> Any:
    """SDPA of local queries ``[B, H, Tq, D]`` over keys/values ``[B, Hkv, Tk, D]`` (grouped-query
    heads are repeated) with a boolean ``mask`` ``[B, 1, Tq, Tk]``; returns ``[B, Tq, H, D]``, the
    layout transformers' attention functions return."""
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.size(1) // key.size(1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask.to(query.device),
                                         dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous()


def context_parallel_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                               scaling: float | None = None, dropout: float = 0.0,
                               cp_shard: ContextParallelShard | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers attention function ``"automodel_cp"``: gathers the cp group's keys and values
    (one collective for both) and attends with ``cp_shard.mask``. ``attention_mask`` is ignored
    (transformers builds none for an implementation it has no mask function for; the shard's mask
    replaces it)."""
    import torch

    if cp_shard is None:
        raise RuntimeError(f"attention {ATTENTION!r} needs the model called with cp_shard= "
                           "(from context_parallel.shard_batch)")
    _refuse_unsupported_layer(module, kwargs)
    key_value = cp_shard.gather(torch.stack([key, value]), dim=3)  # [2, B, Hkv, T, D]
    return attend(query, key_value[0], key_value[1], cp_shard.mask, scaling, dropout), None


def _refuse_unsupported_layer(module: Any, kwargs: dict[str, Any]) -> None:
    for name in ("sliding_window", "softcap", "position_bias", "s_aux"):
        if kwargs.get(name) is not None or (name == "sliding_window" and getattr(module, name, None)):
            raise NotImplementedError(f"context-parallel attention does not support {name} "
                                      f"({type(module).__name__})")


def refuse_unsupported(model: Any) -> None:
    """UserError for a model whose attention context parallelism cannot reproduce exactly."""
    from automodel_cli.components.models.structure import text_config, unwrap

    config = text_config(unwrap(model).config)
    problem = unsupported_problem(config.to_dict())
    if problem:
        raise UserError(problem, "Use cp=1 for this model (data, tensor or sequence parallelism still apply).")


def unsupported_problem(config: dict[str, Any]) -> str | None:
    """Why context parallelism cannot run the model of ``config`` (a config.json dict, its text
    part for a multimodal model), or None. Pure: the checks before launch call it too."""
    layer_types = config.get("layer_types") or ()
    reasons = []
    if "sliding_attention" in layer_types or (config.get("use_sliding_window") and config.get("sliding_window")):
        reasons.append("sliding-window attention layers")
    if config.get("attn_logit_softcapping") is not None:
        reasons.append("attention logit soft-capping")
    if not reasons:
        return None
    return (f"Context parallelism cannot run {config.get('model_type', 'this model')}: it has "
            f"{' and '.join(reasons)}, which the context-parallel attention does not implement.")


def register_attention() -> None:
    """Make ``"automodel_cp"`` a valid ``attn_implementation`` (idempotent)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(ATTENTION, context_parallel_attention)


def use_context_parallel_attention(model: Any) -> Any:
    """Switch ``model`` (and its sub-models) to the context-parallel attention; returns it."""
    from automodel_cli.components.models.structure import unwrap

    refuse_unsupported(model)
    register_attention()
    unwrap(model).set_attn_implementation(ATTENTION)
    return model
