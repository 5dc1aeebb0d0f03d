"""The layout chooser: candidates, their memory (the memory plan through the adapter), the
step-time formulas computed by hand, and the choice on a small model, Llama 3.1 8B at 32k
context, a 70B model, a mixture of experts and a CPU world (the module docstring derives every
formula)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from automodel_cli.assets import bundled_config
from automodel_cli.components.training.layout import (HARDWARE, MEMORY_MARGIN, TIE_TOLERANCE, Layout,
                                                       bubble_fraction, choose_layout, describe, in_flight,
                                                       layout_memory, pipeline_plan, step_time)
from automodel_cli.components.training.memory_plan import Architecture, Setup, plan
from automodel_cli.errors import UserError

H100 = HARDWARE["h100"]
USABLE = H100.memory * (1 - MEMORY_MARGIN)


def bundled(name: str) -> Architecture:
    return Architecture.from_config(json.loads(bundled_config(name).read_text()))


LLAMA_1B = bundled("meta-llama/Llama-3.2-1B-Instruct")
LLAMA_8B = bundled("meta-llama/Llama-3.1-8B-Instruct")
QWEN3_MOE = bundled("Qwen/Qwen3-30B-A3B")
#: Llama 3.1 70B's config.json sizes.
LLAMA_70B = Architecture(hidden=8192, layers=80, heads=64, kv_heads=8, head_dim=128, intermediate=28672,
                         vocab=128256)
TINY = Architecture(hidden=32, layers=4, heads=4, kv_heads=2, head_dim=8, intermediate=64, vocab=96)


def world_sizes_and_rules_hold(candidates, nodes, gpus_per_node, seq_len, arch):
    for candidate in candidates:
        layout = candidate.layout
        assert layout.world_size == nodes * gpus_per_node
        if candidate.memory is not None:  # a layout the mesh rules allow
            assert layout.tp <= gpus_per_node and arch.heads % layout.tp == 0 and arch.kv_heads % layout.tp == 0
            assert seq_len % (2 * layout.cp) == 0 or layout.cp == 1
            assert layout.pp <= arch.layers


# --------------------------------------------------------------------------- formulas
def test_bubble_fraction_by_hand():
    assert bubble_fraction(1, 8) == 0
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)  # (p - 1) / (m + p - 1)
    assert bubble_fraction(4, 8, virtual_stages=2) == pytest.approx(3 / 19)  # (p - 1) / (v m + p - 1)
    assert in_flight(Layout(pp=4, accumulation=8)) == 4
    assert in_flight(Layout(pp=4, accumulation=2)) == 2
    # Interleaved: Megatron's warm-up (v - 1) p + 2 (p - 1) + 1 chunks of L / (p v) layers.
    assert in_flight(Layout(pp=4, accumulation=8, virtual_stages=2)) == pytest.approx((4 + 6 + 1) / 2)


def test_llama_8b_parameter_counts_by_hand():
    h, kv, i, vocab, layers = 4096, 8 * 128, 14336, 128256, 32
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    assert LLAMA_8B.parameters().total == 2 * vocab * h + layers * layer + h == 8_030_261_248


def test_compute_and_fsdp_terms_by_hand():
    """Plain FSDP over 2 x 8 H100, full checkpointing, 16 x 32k tokens: compute is
    ``(6 N_active + 12 L q s) tokens (1 + 1/3) / (W peak eff)``; FSDP all-gathers bf16 weights twice
    and reduce-scatters fp32 gradients over 16 ranks across nodes."""
    seq, batch = 32768, 16
    layout = Layout(dp_shard=16, micro_batch=1, accumulation=1, activation_checkpointing="full")
    time = step_time(LLAMA_8B, Setup(micro_batch=1, seq_len=seq), layout, seq_len=seq, global_batch=batch,
                     gpus_per_node=8, hardware=H100)
    n_active = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336) + 128256 * 4096
    flops_per_token = 6 * n_active + 12 * 32 * 4096 * seq
    assert time.compute == pytest.approx(flops_per_token * batch * seq * (4 / 3) / (16 * 989.4e12 * 0.4), rel=1e-9)
    n = 8_030_261_248
    assert time.fsdp == pytest.approx((2 * 15 / 16 * 2 * n + 15 / 16 * 4 * n) / 50e9, rel=1e-9)
    assert time.tp == time.cp == time.ep == time.pp == time.bubble == 0
    assert time.total == pytest.approx(time.compute + max(0, time.fsdp - 0.8 * time.compute), rel=1e-12)


def test_tensor_parallel_volume_by_hand():
    """tp=2: two all-reduces per layer forward and two backward of ``b s h`` bf16 values, ring
    cost ``2 (t - 1) / t`` of the size over NVLink, for each of the 2 micro-batches."""
    seq = 32768
    layout = Layout(dp_shard=8, tp=2, micro_batch=1, accumulation=2)
    time = step_time(LLAMA_8B, Setup(micro_batch=1, seq_len=seq), layout, seq_len=seq, global_batch=16,
                     gpus_per_node=8, hardware=H100)
    assert time.tp == pytest.approx(2 * 32 * 4 * (2 * 1 / 2) * (2 * 1 * seq * 4096) / 450e9, rel=1e-12)
    full = step_time(LLAMA_8B, Setup(micro_batch=1, seq_len=seq), replace(layout, activation_checkpointing="full"),
                     seq_len=seq, global_batch=16, gpus_per_node=8, hardware=H100)
    assert full.tp == pytest.approx(time.tp * 6 / 4, rel=1e-12)  # recomputed forward: two more per layer


def test_pipeline_step_time_pays_the_bubble():
    layout = Layout(pp=4, dp_shard=2, micro_batch=1, accumulation=8)
    time = step_time(TINY, Setup(micro_batch=1, seq_len=64), layout, seq_len=64, global_batch=16,
                     gpus_per_node=8, hardware=H100)
    assert time.bubble == pytest.approx(3 / 11)
    pipelined = time.compute + time.tp + time.ep + time.pp
    assert time.total == pytest.approx(pipelined / (1 - 3 / 11) + time.exposed, rel=1e-12)


# ------------------------------------------------------------------------------ memory
def test_context_parallel_memory_is_the_runs_memory_plan():
    """cp=2: the layout's memory is the plan the run itself prints (``Setup.cp=2``: seq / 2
    tokens per rank, FSDP over dp_shard x cp, every layer's gathered keys and values kept), and
    more than the plan of a shorter sequence without cp by those gathered keys and values."""
    base = Setup(micro_batch=2, seq_len=64)
    layout = Layout(dp_shard=2, cp=2, micro_batch=2)
    memory, _ = layout_memory(TINY, base, layout, seq_len=64, device="cuda")
    assert memory == plan(TINY, replace(base, dp_shard=2, cp=2, device="cuda")).peak
    shorter = plan(TINY, replace(base, seq_len=32, dp_shard=4, device="cuda"))
    assert memory > shorter.peak


def test_pipeline_first_stage_keeps_micro_batches_in_flight():
    """pp=2: a stage is half the layers with one vocabulary matrix; the first stage has no
    logits but the activations of min(pp, m) = 2 micro-batches."""
    base = Setup(micro_batch=1, seq_len=256)
    layout = Layout(pp=2, dp_shard=2, micro_batch=1, accumulation=4)
    memory, phase = layout_memory(TINY, base, layout, seq_len=256, device="cpu")
    stage = plan(replace(TINY, layers=2, tied=True), replace(base, dp_shard=2, accumulation=4))
    first = stage.phases["loss backward"] - stage.logits + stage.activations
    assert memory == int(max(first, *stage.phases.values()))
    assert phase.endswith("stage")


# ------------------------------------------------------------------------------ choices
def test_small_model_on_one_node_uses_plain_fsdp():
    best, candidates = choose_layout(LLAMA_1B, nodes=1, gpus_per_node=8, seq_len=2048, global_batch=32)
    assert (best.layout.pp, best.layout.tp, best.layout.cp, best.layout.dp_replicate) == (1, 1, 1, 1)
    assert best.layout.dp_shard == 8 and best.fits and best.memory <= USABLE
    world_sizes_and_rules_hold(candidates, 1, 8, 2048, LLAMA_1B)


def test_llama_8b_at_32k_context_needs_cp_or_tp_or_checkpointing():
    """16 x 32k tokens on 2 x 8 H100: without cp, tp or checkpointing no layout fits (the 32k
    tokens' activations); the chosen one fits and no fitting layout is faster beyond the tie
    tolerance unless it uses more parallel dimensions."""
    best, candidates = choose_layout(LLAMA_8B, nodes=2, gpus_per_node=8, seq_len=32768, global_batch=16)
    world_sizes_and_rules_hold(candidates, 2, 8, 32768, LLAMA_8B)
    plain = [c for c in candidates if c.memory is not None and c.layout.cp == c.layout.tp == 1
             and c.layout.activation_checkpointing == "none"]
    assert plain and not any(c.fits for c in plain)
    assert all("needs" in c.rejected and "GiB" in c.rejected for c in plain)
    assert best.layout.cp > 1 or best.layout.tp > 1
    assert best.fits and best.memory <= USABLE
    for other in candidates:
        if other.fits and other.time.total < best.time.total:
            assert other.time.total >= best.time.total / (1 + TIE_TOLERANCE) - 1e-12
            assert other.layout.dimensions > best.layout.dimensions
    text = "\n".join(describe(candidates))
    assert text.splitlines()[1].startswith(best.layout.mesh_label()) and "chosen" in text.splitlines()[1]
    assert "Chosen: " + best.layout.mesh_label() in text
    assert "more layout(s)" in text.splitlines()[-3]  # 20 rows by default
    every = describe(candidates, best, limit=1000)
    assert "tp=16" in "\n".join(every) and "would span nodes" in "\n".join(every)
    assert any("needs" in line and "GiB usable" in line for line in every)


def test_llama_70b_on_two_nodes_splits_the_model_inside_nodes():
    """bf16 weights and moments: tp stays inside a node (tp=16 is refused), the model is split
    over all 16 GPUs (FSDP shards, tp=8 or pipeline stages) and no layout with every weight on
    one GPU fits; with fp32 master weights nothing fits and the error says so."""
    base = Setup(micro_batch=1, seq_len=8192, model_dtype="bfloat16")
    best, candidates = choose_layout(LLAMA_70B, nodes=2, gpus_per_node=8, seq_len=8192, global_batch=32, base=base)
    assert best.layout.dp_shard * best.layout.cp * best.layout.tp * best.layout.pp > 1
    assert best.fits and best.memory <= USABLE
    assert not any(c.fits for c in candidates if c.layout.dp_shard * c.layout.tp * c.layout.pp * c.layout.cp == 1)
    refused = [c for c in candidates if c.layout.tp == 16]
    assert refused and all(c.rejected == "tp=16 would span nodes (8 GPUs per node)" for c in refused)
    world_sizes_and_rules_hold(candidates, 2, 8, 8192, LLAMA_70B)
    with pytest.raises(UserError) as error:  # fp32 weights + AdamW: 16 bytes per parameter over 16 GPUs
        choose_layout(LLAMA_70B, nodes=2, gpus_per_node=8, seq_len=8192, global_batch=32)
    message = str(error.value)
    assert "No layout of 2 node(s) x 8 process(es) fits 70.6B parameters" in message
    assert "smallest peak" in message and "--peft lora" in message


def test_mixture_of_experts_uses_expert_parallelism():
    """Qwen3-30B-A3B on 2 x 8 H100 with the dimensions that exist today: FSDP would gather every
    expert of every layer each micro-batch; expert parallelism keeps them in place."""
    best, candidates = choose_layout(QWEN3_MOE, nodes=2, gpus_per_node=8, seq_len=4096, global_batch=64,
                                     allowed=("dp", "tp", "ep"))
    assert best.layout.ep > 1 and best.fits
    assert QWEN3_MOE.experts % best.layout.ep == 0 and best.layout.dp_shard % best.layout.ep == 0
    without = [c for c in candidates if c.fits and c.layout.ep == 1]
    assert without and min(c.time.total for c in without) > best.time.total * (1 + TIE_TOLERANCE)
    assert best.time.ep > 0 and best.time.ep_sync > 0


@pytest.mark.parametrize("processes", [2, 4])
def test_cpu_world_gets_a_layout_that_exists_today(processes):
    best, candidates = choose_layout(TINY, nodes=1, gpus_per_node=processes, seq_len=64, global_batch=8,
                                     hardware="cpu", capacity=2**30, allowed=("dp", "tp", "ep"))
    assert all(c.layout.pp == c.layout.cp == 1 for c in candidates)
    assert best.layout.pp == best.layout.cp == 1 and best.layout.world_size == processes
    assert best.layout.dp_shard == processes  # the simplest: FSDP over every process


def test_unknown_dimension_is_refused():
    with pytest.raises(ValueError, match="unknown layout dimension 'xp'"):
        choose_layout(TINY, nodes=1, gpus_per_node=2, seq_len=64, global_batch=2, allowed=("dp", "xp"))


def test_a_global_batch_no_layout_can_split_is_a_user_error():
    with pytest.raises(UserError, match="does not split over dp=2"):
        choose_layout(TINY, nodes=1, gpus_per_node=2, seq_len=64, global_batch=3, hardware="cpu",
                      allowed=("dp",))


def test_fixed_sizes_are_kept_and_the_rest_chosen():
    """tp fixed at 2 on 4 processes: every candidate has tp=2 (so dp x cp x pp = 2); a fixed
    micro-batch that does not divide the 8 / dp sequences per rank is a reason, not a layout."""
    best, candidates = choose_layout(TINY, nodes=1, gpus_per_node=4, seq_len=64, global_batch=8, hardware="cpu",
                                     capacity=2**30, fixed={"tp": 2})
    assert candidates and all(c.layout.tp == 2 for c in candidates) and best.layout.tp == 2
    assert {c.layout.mesh() for c in candidates if c.fits} >= {(1, 1, 2, 1, 2, 1), (2, 1, 1, 1, 2, 1)}
    best, candidates = choose_layout(TINY, nodes=1, gpus_per_node=4, seq_len=64, global_batch=8, hardware="cpu",
                                     capacity=2**30, fixed={"dp_shard": 4, "micro_batch": 2})
    assert [c.layout.mesh() for c in candidates] == [(1, 1, 4, 1, 1, 1)] * 3  # one per checkpointing mode
    assert best.layout.micro_batch == 2 and best.layout.accumulation == 1
    with pytest.raises(UserError, match="micro-batch 3 does not divide the 4 sequences per data-parallel rank"):
        choose_layout(TINY, nodes=1, gpus_per_node=2, seq_len=64, global_batch=8, hardware="cpu",
                      capacity=2**30, fixed={"dp_shard": 2, "micro_batch": 3, "tp": 1, "pp": 1, "cp": 1})
    with pytest.raises(UserError, match="has tp=3"):
        choose_layout(TINY, nodes=1, gpus_per_node=4, seq_len=64, global_batch=8, hardware="cpu", fixed={"tp": 3})
    with pytest.raises(ValueError, match="cannot fix seq"):
        choose_layout(TINY, nodes=1, gpus_per_node=4, seq_len=64, global_batch=8, hardware="cpu", fixed={"seq": 3})


def test_expert_and_context_parallelism_are_not_combined():
    moe = replace(TINY, experts=4, active_experts=2)
    _, candidates = choose_layout(moe, nodes=1, gpus_per_node=4, seq_len=64, global_batch=8, hardware="cpu",
                                  capacity=2**30)
    both = [c for c in candidates if c.layout.ep > 1 and c.layout.cp > 1]
    assert both and all(c.rejected == "expert parallelism does not run under context parallelism" for c in both)


def test_a_pipeline_plan_is_the_larger_stage_of_the_run():
    """pp=2 over 4 layers, 4 micro-batches: the last stage is the plan of 2 layers with one
    vocabulary matrix; the first holds 2 micro-batches' activations without the logits."""
    setup = Setup(micro_batch=1, seq_len=256, accumulation=4)
    result = pipeline_plan(TINY, setup, pp=2)
    last = plan(replace(TINY, layers=2, tied=True), setup)
    first = last.phases["loss backward"] - last.logits + last.activations
    assert result.peak == max(int(first), *last.phases.values())
    assert result.phases["loss backward, first stage"] == int(first)
    assert result.total_parameters == TINY.parameters().total
    assert pipeline_plan(TINY, setup, pp=1) == plan(TINY, setup)
