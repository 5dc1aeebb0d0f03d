"""Multi-process worker for the distributed parity tests (launched by torchrun).

    torchrun --standalone --nproc-per-node N _dist_worker.py OUT.json SCENARIO [SCENARIO ...]

Every scenario trains a tiny model for a few steps on a fixed global batch, split across the
data-parallel ranks exactly as the recipe does (loss = sum of token CE / label tokens of the whole
global step, gradients summed by FSDP), and rank 0 replays the same loop in one process without
any parallelism. Rank 0 writes both loss curves, grad norms and the final parameter difference.
"""

from __future__ import annotations

import copy
import json
import sys
import time
import types

import torch

from automodel_cli.components.distributed.env import destroy, exit_process, init_distributed
from automodel_cli.components.distributed.mesh import (
    MeshShape,
    all_reduce_dp,
    build_mesh,
    dp_rank,
    dp_world_size,
)
from automodel_cli.components.distributed.parallelize import (
    clip_grad_norm_,
    gather_full_state_dict,
    parallelize_model,
)
from automodel_cli.components.loss.masked_ce import masked_cross_entropy
from automodel_cli.components.optim.build import build_optimizer
from automodel_cli.registry import ParallelPlanRegistry
from automodel_cli.plugins import parallel_plans

STEPS = 10
GLOBAL_BATCH = 8
MICRO_BATCH = 2
SEQ = 16
VOCAB = 128
LR = 1e-3
MAX_NORM = 1.0

# name -> (architecture, dp_replicate, dp_shard, tp, options)
SCENARIOS = {
    "fsdp": ("llama", 1, 2, 1, {}),
    "fsdp_ac": ("llama", 1, 2, 1, {"ac": True}),
    "tp": ("llama", 1, 1, 2, {}),
    "tp_sp": ("llama", 1, 1, 2, {"sp": True}),
    "lora_fsdp": ("llama", 1, 2, 1, {"lora": True}),
    "fsdp_bf16": ("llama", 1, 2, 1, {"mixed_precision": True}),
    "lora_tp_sp": ("llama", 1, 1, 2, {"lora": True, "sp": True}),
    "qwen3_tp": ("qwen3", 1, 1, 2, {}),
    "qwen2_tp": ("qwen2", 1, 1, 2, {}),
    "gemma2_tp_sp": ("gemma2", 1, 1, 2, {"sp": True}),
    "gemma3_tp_sp": ("gemma3_text", 1, 1, 2, {"sp": True}),
    "phi3_tp": ("phi3", 1, 1, 2, {}),
    "phi3_tp_sp": ("phi3", 1, 1, 2, {"sp": True}),
    "fsdp_tp": ("llama", 1, 2, 2, {}),
    "fsdp_tp_sp_ac": ("llama", 1, 2, 2, {"sp": True, "ac": True}),
    "hsdp": ("llama", 2, 2, 1, {}),
    "lora_fsdp_tp": ("qwen3", 1, 2, 2, {"lora": True}),
}


def make_model(arch: str, **overrides):
    from transformers import AutoModelForCausalLM

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    common.update(overrides)
    if arch == "llama":
        from transformers import LlamaConfig
        config = LlamaConfig(**common)
    elif arch == "qwen3":
        from transformers import Qwen3Config
        config = Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)
    elif arch == "qwen2":
        from transformers import Qwen2Config
        config = Qwen2Config(**common)
    elif arch == "gemma2":
        from transformers import Gemma2Config
        config = Gemma2Config(**common, head_dim=16, sliding_window=8, pad_token_id=0,
                              bos_token_id=1, eos_token_id=2)
        config._attn_implementation = "eager"
    elif arch == "gemma3_text":
        from transformers import Gemma3TextConfig
        config = Gemma3TextConfig(**common, head_dim=16, sliding_window=8, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2)
        config._attn_implementation = "eager"
    elif arch == "phi3":
        from transformers import Phi3Config
        config = Phi3Config(**common, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    else:
        raise ValueError(arch)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def add_lora(model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    # LoRA B starts at zero; give it values so the first steps already exercise every path.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model


def batch(step: int):
    generator = torch.Generator().manual_seed(1000 + step)
    input_ids = torch.randint(3, VOCAB, (GLOBAL_BATCH, SEQ), generator=generator)
    labels = input_ids.clone()
    for j in range(GLOBAL_BATCH):
        labels[j, : (3 * j + step) % 11] = -100  # uneven label counts across samples and ranks
    return input_ids, labels


def label_tokens(labels) -> int:
    return int((labels[:, 1:] != -100).sum())


def train(model, mesh, steps: int, clip):
    optimizer = build_optimizer(model, types.SimpleNamespace(weight_decay=0.01, betas=(0.9, 0.999),
                                                             eps=1e-8), LR)
    n_dp, r_dp = dp_world_size(mesh), dp_rank(mesh)
    per_rank = GLOBAL_BATCH // n_dp
    losses, norms = [], []
    for step in range(steps):
        input_ids, labels = batch(step)
        input_ids = input_ids[r_dp * per_rank:(r_dp + 1) * per_rank]
        labels = labels[r_dp * per_rank:(r_dp + 1) * per_rank]
        tokens = all_reduce_dp(torch.tensor(label_tokens(labels)), mesh)
        loss_sum = torch.zeros(())
        for start in range(0, per_rank, MICRO_BATCH):
            logits = model(input_ids=input_ids[start:start + MICRO_BATCH], use_cache=False).logits
            loss = masked_cross_entropy(logits, labels[start:start + MICRO_BATCH], tokens)
            loss.backward()
            loss_sum += loss.detach()
        losses.append(float(all_reduce_dp(loss_sum, mesh)))
        norms.append(float(clip([p for p in model.parameters()], MAX_NORM)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, norms


def run(name: str, env, registry) -> dict:
    arch, rep, shard, tp, options = SCENARIOS[name]
    torch.manual_seed(0)  # identical initial weights on every rank
    model = make_model(arch)
    if options.get("lora"):
        model = add_lora(model)
    reference = copy.deepcopy(model) if env.is_main else None
    shape = MeshShape.resolve(rep, shard, tp, env.world_size)
    mesh = build_mesh(shape, "cpu")
    model.train()
    parallelize_model(model, mesh, plan_registry=registry, tp=tp,
                      sequence_parallel=options.get("sp", False),
                      activation_checkpointing=options.get("ac", False),
                      mixed_precision=options.get("mixed_precision", False))
    started = time.perf_counter()
    losses, norms = train(model, mesh, STEPS, clip_grad_norm_)
    elapsed = time.perf_counter() - started
    state = gather_full_state_dict(model)
    adapters = gather_full_state_dict(model, trainable_only=True) if options.get("lora") else None
    if not env.is_main:
        return {}
    reference.train()
    ref_losses, ref_norms = train(reference, None, STEPS, torch.nn.utils.clip_grad_norm_)
    ref_state = reference.state_dict()
    missing = sorted(set(ref_state) ^ set(state))
    diff = max(float((state[k].float() - ref_state[k].float()).abs().max()) for k in ref_state if k in state)
    scale = max(float(ref_state[k].float().abs().max()) for k in ref_state)  # diff is judged against it
    extra = {}
    if adapters is not None:
        extra["adapter_keys_ok"] = bool(adapters) and all("lora_" in k for k in adapters) and all(
            torch.equal(adapters[k], state[k]) for k in adapters)
    return {**extra, "losses": losses, "ref_losses": ref_losses, "grad_norms": norms, "ref_grad_norms": ref_norms,
            "max_param_diff": diff, "param_scale": scale, "state_key_mismatch": missing[:10], "seconds": elapsed,
            "trainable": sorted(k for k, p in reference.named_parameters() if p.requires_grad)[:3]}


def main() -> None:
    out, names = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    env = init_distributed()
    registry = ParallelPlanRegistry()
    parallel_plans.register_parallel_plans(registry)
    results = {}
    for name in names:
        results[name] = run(name, env, registry)
    finish(env, out, results)


def finish(env, out, results) -> None:
    """The end of every multi-process test worker: rank 0 writes ``results`` as JSON to ``out``,
    every rank waits for the others, tears the process group down and exits with 0 by
    ``exit_process``, which skips the interpreter teardown where gloo's leftover worker threads
    can abort a finished process."""
    if env.is_main:
        with open(out, "w") as handle:
            json.dump(results, handle, indent=1)
    if env.distributed:
        torch.distributed.barrier()
    destroy()
    exit_process(0)


if __name__ == "__main__":
    main()
