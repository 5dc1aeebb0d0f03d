"""Choosing a parallel layout: pipeline, data, context and tensor parallel sizes, the micro-batch
and activation checkpointing, from the memory plan and a simple step-time model.

Developer note
==============

State: a pure component (no torch, no config keys, no CLI). ``choose_layout`` enumerates the
layouts of ``nodes x gpus_per_node`` processes, computes each one's memory per process with
``memory_plan.plan`` (through the thin adapter ``layout_memory``) and its step time with
``step_time``, and picks one; ``describe`` prints the table and the reason. ``fixed`` pins sizes
the user gave (dimensions, the micro-batch). ``pipeline_plan`` is also the run's own memory plan
of a pipelined run, so ``automodel plan`` and the layout table print one peak.

Wired by ``training/auto_layout.py`` (``distributed.auto=true``): it builds ``base`` from the
resolved config as ``training/memory_plan.py`` does, picks the ``Hardware`` from the device,
passes the dimensions the model and recipe can use as ``allowed`` and the explicitly set keys as
``fixed``, and maps the chosen ``Layout`` to ``distributed.*`` and ``train.*`` keys before the
job is launched (docs/distributed.md, "Automatic layout").

What the model predicts today, worth knowing before trusting it: Llama 3.1 8B at 32k context on
2 x 8 H100 gets ``dp_replicate=2 x cp=8`` without checkpointing (cp alone brings the activations
under the margin); Qwen3-30B-A3B on 2 x 8 gets ``dp_shard=16 x ep=8`` over the dimensions that
exist, but ``pp=16`` once pp is allowed (no data-parallel traffic at all, and every matmul is
charged the same efficiency, so small per-stage matmuls and uneven expert routing cost nothing
here). Calibrating ``GPU_EFFICIENCY`` per shape against ``automodel benchmark`` is the next step.

Assumptions (each is an approximation, named where it is made):

* Mesh order, outermost first: ``pp, dp_replicate, dp_shard, cp, tp`` (torchtitan's). ``tp`` is
  innermost and must stay inside a node; ``ep`` groups ``ep`` neighbouring dp_shard ranks (as
  ``distributed/mesh.py`` builds them); ``dp_replicate > 1`` (HSDP) only when each replica
  covers whole nodes, so replicas talk across nodes and shards inside them.
* FSDP2 shards over ``dp_shard x cp`` (the cp ranks hold the same parameters, as in
  torchtitan), so the memory plan gets ``dp_shard x cp`` as its ``dp_shard``.
* A group's bandwidth is the intra-node one when its ranks (``span`` consecutive ranks) fit in one
  node, else the inter-node one; the slowest link decides.
* The run reduces gradients every micro-batch (FSDP2's default; nothing turns gradient sync off
  during accumulation), so FSDP's all-gathers and reduce-scatter happen per micro-batch.

Memory per process (``layout_memory``)
--------------------------------------

``memory_plan.plan`` is unchanged; the adapter changes its inputs:

* context parallelism: the plan's own ``Setup.cp`` (the run's plan models cp the same way, so
  ``automodel plan`` and the layout table agree): a rank holds ``seq / cp`` tokens of each
  sequence (activations and logits divided by ``cp``), parameters are sharded over ``dp_shard
  x cp``, and every layer keeps its all-gathered keys and values (repeated to the query heads)
  for attention's backward, plus the ``[b, seq / cp, seq]`` boolean mask;
* pipeline parallelism (``pp > 1``): a stage holds ``ceil(L / pp)`` layers and one vocabulary
  matrix (the first stage the embedding, the last the head): the plan runs on the architecture
  with ``layers = ceil(L / pp)`` and tied embeddings (one ``V h`` matrix, the loss still over
  ``V``). That is the last stage (one micro-batch in flight, the loss's logits). The first stage
  has no logits but keeps the activations of ``k`` micro-batches in flight: 1F1B ``k = min(pp,
  m)``; interleaved with ``v`` chunks ``k = min(m v, (v - 1) pp + 2 (pp - 1) + 1) / v`` stage
  equivalents (Megatron's warm-up). Its peak is the plan's forward/backward phases less the
  logits plus ``(k - 1)`` times the activations (an upper bound: the final norm's and head
  input's activations stay counted). The layout's memory is the larger of the two stages.

A candidate fits when its peak is at most ``capacity x (1 - margin)``: the plan leaves out the
CUDA context, the caching allocator's reserve, NCCL buffers and workspaces (docs/memory.md,
"Accuracy"); ``MEMORY_MARGIN`` = 10% stands for them.

Step time (``step_time``), seconds per optimizer step
-----------------------------------------------------

Symbols: ``W`` processes, ``B`` global batch (sequences), ``s`` sequence length, ``b``
micro-batch, ``m`` micro-batches per step on a rank (``B / (dp b)``, ``dp = dp_replicate x
dp_shard``), ``L`` layers (``L_s = ceil(L / pp)`` per stage), ``h`` hidden, ``kv`` key/value
width, ``k_e`` active experts, ``c`` bytes of an activation (2 under bf16, else 4), ``peak`` and
``eff`` of the hardware. Collectives on ``n`` ranks at bandwidth ``bw`` (ring algorithms)::

    all_reduce(x)      = 2 (n - 1) / n * x / bw
    all_gather(x)      = reduce_scatter(x) = (n - 1) / n * x / bw    (x: the whole gathered size)
    all_to_all(x)      = (n - 1) / n * x / bw                        (x: what one rank sends)

Terms:

* compute = ``F * B s * (1 + r) / (W * peak * eff)``, ``F = 6 N_active + 12 L a d s`` FLOPs per
  token (``flops.py``'s convention: every active matmul weight, the LM head included, and
  attention over the full square). ``r`` the recompute fraction: checkpointing reruns the
  forward pass (a third of the training FLOPs) of the checkpointed layers: full ``1/3``,
  selective (every other layer, as ``memory_plan``) ``ceil(L_s / 2) / L_s / 3``.
* TP = ``m L_s (4 + 2 f) all_reduce(c b (s / cp) h)`` over ``tp`` ranks, intra-node: two
  all-reduces per layer forward, two backward, two more per recomputed layer (``f`` the fraction
  of layers checkpointed); sequence parallelism moves the same bytes (reduce-scatter +
  all-gather).
* FSDP = ``m [2 all_gather(P g) + reduce_scatter(P g_r)]`` over ``S = dp_shard x cp`` ranks,
  ``P = N / (tp pp)`` parameters a rank computes with (the routed experts left out under ep:
  they are not gathered), ``g`` bytes of the gathered dtype (bf16 under mixed precision),
  ``g_r`` of the reduction (fp32 under mixed precision); forward and backward each gather (the
  layers reshard after forward).
* HSDP = ``m all_reduce(P g_r / S)`` over ``dp_replicate`` ranks, across nodes.
* CP = ``m L_s (2 + f) all_gather(c b s 2 kv / tp)`` over ``cp`` ranks: K and V gathered in
  forward (and again per recomputed layer), their gradients reduce-scattered in backward.
* EP = ``m L_s 4 all_to_all(c b (s / cp) k_e h)`` over ``ep`` ranks (dispatch and combine,
  forward and backward).
* EP sync = ``all_reduce(E p / ep)`` over the ``dp / ep`` ranks holding the same experts, once
  per step after the last backward (``moe.dispatch.sum_replica_grads``; ``E`` routed-expert
  parameters of a stage, ``p`` bytes of a parameter: FSDP2 does not manage them).
* PP point-to-point = ``m 2 c b (s / cp) h / bw``: each micro-batch's activation forward and
  its gradient backward, across stages.
* bubble (1F1B) = ``(pp - 1) / (m + pp - 1)``; interleaved with ``v`` virtual stages
  ``(pp - 1) / (v m + pp - 1)`` (the idle time is divided by ``v``); 1F1B needs ``m >= pp``.

TP, EP and the pipeline's sends sit on the critical path, the EP sync after it; FSDP, HSDP and
CP overlap with compute (prefetched all-gathers, reduce-scatters behind the next layer's
backward, ring attention) up to ``OVERLAP`` of it::

    step = (compute + TP + EP + PP) / (1 - bubble) + EP sync
           + max(0, FSDP + HSDP + CP - OVERLAP * compute)

Choice: the candidates that fit; among them those within ``TIE_TOLERANCE`` of the fastest; among
those the fewest parallel dimensions (> 1), then the fastest, then the one that communicates least
(hidden communication still takes links and memory bandwidth: when compute hides everything, as
for a small model, this prefers plain data parallelism and large micro-batches), then the fewest
micro-batches, then the least memory. The model's accuracy is that of its constants
(``Hardware``, ``OVERLAP``, ``MEMORY_MARGIN``): it ranks layouts, it does not promise
seconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace

from automodel_cli.components.distributed.plans import tp_problems
from automodel_cli.components.training.flops import lookup_peak
from automodel_cli.components.training.memory_plan import (DTYPE_BYTES, GIB, Architecture, MemoryPlan, Setup, gib,
                                                            plan)
from automodel_cli.errors import UserError

#: The layout's dimensions, outermost first; ``ep`` splits dp_shard, it adds no mesh dimension.
DIMENSIONS = ("pp", "dp_replicate", "dp_shard", "cp", "tp", "ep")
#: ``allowed`` may name both data-parallel dimensions at once.
ALIASES = {"dp": ("dp_replicate", "dp_shard")}
#: What ``fixed`` may pin besides the dimensions: the micro-batch (sequences per forward pass).
FIXABLE = DIMENSIONS + ("micro_batch",)
CHECKPOINTING = ("none", "selective", "full")
#: Share of the plan's peak left free for what it does not count (CUDA context, allocator reserve,
#: NCCL buffers, kernel workspaces).
MEMORY_MARGIN = 0.10
#: Share of the compute time that hides FSDP's, HSDP's and CP's communication.
OVERLAP = 0.8
#: Layouts whose predicted step times are this close count as equally fast (the simpler wins).
TIE_TOLERANCE = 0.03
#: Forward share of the training FLOPs (2 of 6 per weight): what checkpointing recomputes.
FORWARD_SHARE = 1 / 3


@dataclass(frozen=True)
class Hardware:
    """One device kind: its speed, links and memory; every field may be overridden with
    ``dataclasses.replace`` (a cluster's measured bandwidth, a lower efficiency)."""

    name: str
    device: str  # "cuda" or "cpu": the memory plan's device (precision policy)
    peak_flops: float  # dense FLOP/s of one device in the compute dtype
    efficiency: float  # fraction of the peak matmuls reach in training (MFU-like)
    intra_node_bandwidth: float  # bytes/s per device per direction inside a node
    inter_node_bandwidth: float  # bytes/s per device per direction between nodes
    memory: int  # bytes one process may use


#: Typical training MFU of Llama-style models on Hopper (torchtitan, Megatron reports: 35-45%).
GPU_EFFICIENCY = 0.4
#: NVLink 4 (H100/H200 SXM): 900 GB/s bidirectional, ~450 GB/s per direction.
NVLINK_BANDWIDTH = 450e9
#: One 400 Gb/s InfiniBand NIC per GPU (DGX/HGX H100 reference design: 8 x 400 Gb/s per node); a
#: node with 4 x 400 Gb/s gives each of its 8 GPUs 25e9.
INFINIBAND_BANDWIDTH = 50e9
#: The memory nvidia-smi reports for an H100 SXM (80 GB: 81559 MiB) and an H200 SXM (141 GB: 143771 MiB).
H100_MEMORY = 81559 * 2**20
H200_MEMORY = 143771 * 2**20


def _peak(name: str) -> float:
    """Dense bf16 FLOP/s from ``flops.PEAK_BF16_TFLOPS`` (one table of peaks)."""
    tflops, _ = lookup_peak(name)
    assert tflops is not None, name
    return tflops * 1e12


HARDWARE: dict[str, Hardware] = {
    "h100": Hardware("NVIDIA H100 SXM", "cuda", _peak("H100"), GPU_EFFICIENCY, NVLINK_BANDWIDTH,
                     INFINIBAND_BANDWIDTH, H100_MEMORY),
    "h200": Hardware("NVIDIA H200 SXM", "cuda", _peak("H200"), GPU_EFFICIENCY, NVLINK_BANDWIDTH,
                     INFINIBAND_BANDWIDTH, H200_MEMORY),
    # One CPU process (fp32, a few cores): gloo over loopback inside a host, 10 GbE between hosts.
    # Orders of magnitude only: they rank layouts, the memory is the caller's to give.
    "cpu": Hardware("CPU", "cpu", 2e11, 0.5, 5e9, 1.25e9, 16 * GIB),
}


@dataclass(frozen=True)
class Layout:
    """One way to run the step: the mesh sizes, the micro-batch and checkpointing."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1
    micro_batch: int = 1
    accumulation: int = 1  # micro-batches per optimizer step on one rank (the pipeline's m)
    activation_checkpointing: str = "none"
    virtual_stages: int = 1

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dimensions(self) -> int:
        """Parallel dimensions in use (size > 1): the layout's complexity."""
        return sum(getattr(self, name) > 1 for name in DIMENSIONS)

    def mesh(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in DIMENSIONS)

    def mesh_label(self) -> str:
        sizes = [f"{name}={getattr(self, name)}" for name in DIMENSIONS if getattr(self, name) > 1]
        label = " x ".join(sizes) or "1 process"
        return label + (f" (v={self.virtual_stages})" if self.virtual_stages > 1 else "")

    def batch_label(self) -> str:
        return f"{self.micro_batch} x {self.accumulation}"


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step by term (module docstring, "Step time")."""

    compute: float
    tp: float
    fsdp: float
    hsdp: float
    cp: float
    ep: float
    ep_sync: float
    pp: float
    bubble: float  # fraction of the pipelined time a stage is idle
    total: float

    @property
    def communication(self) -> float:
        """Seconds of every collective and send, hidden or not."""
        return self.tp + self.fsdp + self.hsdp + self.cp + self.ep + self.ep_sync + self.pp

    @property
    def exposed(self) -> float:
        """Overlappable communication that compute does not hide."""
        return max(0.0, self.fsdp + self.hsdp + self.cp - OVERLAP * self.compute)

    @property
    def bubble_time(self) -> float:
        """Seconds a stage waits in the pipeline's fill and drain."""
        return (self.compute + self.tp + self.ep + self.pp) * self.bubble / (1 - self.bubble)

    def terms(self) -> dict[str, float]:
        """The step's seconds besides compute, by cause."""
        return {"compute": self.compute, "TP": self.tp, "EP": self.ep, "EP sync": self.ep_sync,
                "PP sends": self.pp, "bubble": self.bubble_time, "FSDP/HSDP/CP not hidden": self.exposed}


@dataclass
class Candidate:
    """A layout with its verdict: ``rejected`` says why it cannot run or does not fit (None: it
    fits); ``memory`` and ``time`` are None for a layout the model or mesh rules out."""

    layout: Layout
    memory: int | None = None  # peak bytes per process (the larger pipeline stage)
    phase: str | None = None
    time: StepTime | None = None
    rejected: str | None = None

    @property
    def fits(self) -> bool:
        return self.rejected is None


# --------------------------------------------------------------------------- enumeration
def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def expand_allowed(allowed: Iterable[str]) -> set[str]:
    names: set[str] = set()
    for name in allowed:
        if name not in DIMENSIONS and name not in ALIASES:
            raise ValueError(f"unknown layout dimension {name!r} (known: {', '.join(DIMENSIONS + tuple(ALIASES))})")
        names.update(ALIASES.get(name, (name,)))
    return names


def _tp_config(arch: Architecture) -> dict:
    """The config fields ``plans.tp_problems`` reads (the rule ``distributed.tp`` is checked by)."""
    config = {"num_attention_heads": arch.heads, "num_key_value_heads": arch.kv_heads}
    if arch.experts > 1:
        return {**config, "num_experts": arch.experts}
    return {**config, "intermediate_size": arch.intermediate}


def check_fixed(fixed: Mapping[str, int]) -> None:
    unknown = sorted(set(fixed) - set(FIXABLE))
    if unknown:
        raise ValueError(f"cannot fix {', '.join(unknown)} (known: {', '.join(FIXABLE)})")


def mesh_shapes(arch: Architecture, *, nodes: int, gpus_per_node: int, seq_len: int, global_batch: int,
                allowed: Iterable[str], virtual_stages: Iterable[int] = (1,),
                sequence_parallel: bool = False, fixed: Mapping[str, int] | None = None,
                ) -> Iterator[tuple[Layout, str | None]]:
    """Every (pp, dp_replicate, dp_shard, cp, tp, ep[, v]) over the allowed dimensions whose
    product is the world size, with the reason the model or the mesh rules it out (None: it can
    run). ``fixed``: dimensions whose size is given (a user's explicit setting), allowed or not.
    Micro-batch and checkpointing are left at their defaults (``layouts`` expands them)."""
    world = nodes * gpus_per_node
    names = expand_allowed(allowed)
    fixed = fixed or {}

    def sizes(name: str, n: int) -> list[int]:
        if name in fixed:
            return [fixed[name]] if n % fixed[name] == 0 else []
        return divisors(n) if name in names else [1]

    for pp in sizes("pp", world):
        for tp in sizes("tp", world // pp):
            for cp in sizes("cp", world // (pp * tp)):
                rest = world // (pp * tp * cp)
                for dp_replicate in sizes("dp_replicate", rest):
                    dp_shard = rest // dp_replicate
                    if fixed.get("dp_shard", dp_shard) != dp_shard:
                        continue
                    if dp_shard > 1 and "dp_shard" not in names and "dp_shard" not in fixed:
                        continue
                    for ep in (sizes("ep", dp_shard) if arch.experts > 1 else [1]):
                        for v in (virtual_stages if pp > 1 else (1,)):
                            layout = Layout(pp=pp, dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp, tp=tp,
                                            ep=ep, virtual_stages=v)
                            yield layout, mesh_problem(arch, layout, gpus_per_node=gpus_per_node, seq_len=seq_len,
                                                       global_batch=global_batch,
                                                       sequence_parallel=sequence_parallel)


def mesh_problem(arch: Architecture, layout: Layout, *, gpus_per_node: int, seq_len: int, global_batch: int,
                 sequence_parallel: bool = False) -> str | None:
    """Why ``layout``'s mesh cannot run this model (None: it can)."""
    tp, cp, pp = layout.tp, layout.cp, layout.pp
    if tp > gpus_per_node or gpus_per_node % tp:
        return f"tp={tp} would span nodes ({gpus_per_node} GPUs per node)"
    problems = tp_problems(_tp_config(arch), tp)
    if problems:
        return f"tp={tp} does not divide {', '.join(problems)}"
    if cp > 1 and seq_len % (2 * cp):
        return f"sequence {seq_len} is not a multiple of 2 x cp = {2 * cp} (load-balanced halves)"
    if sequence_parallel and tp > 1 and (seq_len // cp) % tp:
        return f"sequence parallelism needs the {seq_len // cp} tokens per rank to be a multiple of tp={tp}"
    if pp * layout.virtual_stages > arch.layers:
        return f"pp={pp} x {layout.virtual_stages} virtual stage(s) exceeds the {arch.layers} layers"
    if layout.dp_replicate > 1 and (layout.dp_shard * cp * tp) % gpus_per_node:
        return f"dp_replicate={layout.dp_replicate} would split a node (a replica must cover whole nodes)"
    if layout.ep > 1 and arch.experts % layout.ep:
        return f"ep={layout.ep} does not divide the {arch.experts} experts"
    if layout.ep > 1 and cp > 1:
        return "expert parallelism does not run under context parallelism"
    if pp > 1 and (cp > 1 or layout.ep > 1):
        return "pipeline stages do not combine with " + ("context" if cp > 1 else "expert") + " parallelism yet"
    if global_batch % layout.dp:
        return f"the global batch {global_batch} does not split over dp={layout.dp} data-parallel ranks"
    return None


def layouts(mesh: Layout, *, global_batch: int, checkpointing: Iterable[str] = CHECKPOINTING,
            micro_batch: int | None = None) -> Iterator[tuple[Layout, str | None]]:
    """``mesh`` with every micro-batch (a divisor of the per-rank batch; only ``micro_batch``
    when given) and checkpointing mode, with the reason it cannot run (None: it can)."""
    per_rank = global_batch // mesh.dp
    if micro_batch is not None and per_rank % micro_batch:
        yield (replace(mesh, micro_batch=micro_batch),
               f"micro-batch {micro_batch} does not divide the {per_rank} sequences per data-parallel rank")
        return
    for micro_batch in [micro_batch] if micro_batch is not None else divisors(per_rank):
        accumulation = per_rank // micro_batch
        problem = None
        if mesh.pp > 1 and accumulation < mesh.pp:
            problem = f"{accumulation} micro-batch(es) per step, 1F1B needs at least pp={mesh.pp}"
        for mode in checkpointing:
            yield replace(mesh, micro_batch=micro_batch, accumulation=accumulation,
                          activation_checkpointing=mode), problem


# ------------------------------------------------------------------------------- memory
def layout_setup(base: Setup, layout: Layout, seq_len: int, device: str) -> Setup:
    """The memory plan's view of one rank of ``layout`` (module docstring, "Memory"): the plan
    models cp itself (``Setup.cp``), as it does for the run, so both give one number."""
    return replace(base, micro_batch=layout.micro_batch, seq_len=seq_len, device=device,
                   dp_replicate=layout.dp_replicate, dp_shard=layout.dp_shard, tp=layout.tp, cp=layout.cp,
                   ep=layout.ep, activation_checkpointing=layout.activation_checkpointing,
                   accumulation=layout.accumulation)


def in_flight(layout: Layout) -> float:
    """Micro-batches whose activations the first pipeline stage holds at once, in whole-stage
    units (1F1B: ``min(pp, m)``; interleaved: Megatron's warm-up over ``v`` chunks)."""
    p, m, v = layout.pp, layout.accumulation, layout.virtual_stages
    if v == 1:
        return min(p, m)
    return min(m * v, (v - 1) * p + 2 * (p - 1) + 1) / v


def layout_memory(arch: Architecture, base: Setup, layout: Layout, *, seq_len: int,
                  device: str) -> tuple[int, str]:
    """(peak bytes per process, the phase and stage it happens in) of ``layout``."""
    result = pipeline_plan(arch, layout_setup(base, layout, seq_len, device), pp=layout.pp,
                           virtual_stages=layout.virtual_stages)
    return result.peak, result.phase


def pipeline_stage(arch: Architecture, pp: int) -> Architecture:
    """One of ``pp`` pipeline stages as the plan sees it: ``ceil(L / pp)`` layers and one
    vocabulary matrix (``tied``: the first stage holds the embedding, the last the head)."""
    return arch if pp == 1 else replace(arch, layers=math.ceil(arch.layers / pp), tied=True)


def pipeline_plan(arch: Architecture, setup: Setup, *, pp: int, virtual_stages: int = 1) -> MemoryPlan:
    """The memory plan of the larger of a pipeline's first and last stages (module docstring,
    "Memory"): the last stage's plan with the first stage's phases added (no logits, the
    activations of the micro-batches in flight); ``pp=1``: the plan. The run's own plan
    (``training/memory_plan.py``) uses it too, so both print one number."""
    if pp == 1:
        return plan(arch, setup)
    last = plan(pipeline_stage(arch, pp), setup)
    extra = (in_flight(Layout(pp=pp, accumulation=setup.accumulation, virtual_stages=virtual_stages)) - 1
             ) * last.activations
    peaks = {f"{phase}, last stage": value for phase, value in last.phases.items()}
    peaks["loss backward, first stage"] = int(last.phases["loss backward"] - last.logits + extra)
    if "layer recompute" in last.phases:
        peaks["layer recompute, first stage"] = int(last.phases["layer recompute"] + extra)
    phase = max(peaks, key=lambda name: peaks[name])
    return replace(last, phases=peaks, peak=int(peaks[phase]), phase=phase,
                   total_parameters=arch.parameters().total)


# ----------------------------------------------------------------------------- step time
def all_reduce(size: float, ranks: int, bandwidth: float) -> float:
    return 2 * (ranks - 1) / ranks * size / bandwidth if ranks > 1 else 0.0


def all_gather(size: float, ranks: int, bandwidth: float) -> float:
    """Also a reduce-scatter of ``size`` bytes, and an all-to-all of ``size`` bytes per rank."""
    return (ranks - 1) / ranks * size / bandwidth if ranks > 1 else 0.0


def bubble_fraction(pp: int, micro_batches: int, virtual_stages: int = 1) -> float:
    """Idle share of a pipelined step: ``(p - 1) / (v m + p - 1)`` (1F1B: ``v = 1``)."""
    return (pp - 1) / (virtual_stages * micro_batches + pp - 1)


def recompute_fraction(layers: int, mode: str) -> float:
    """Share of a stage's layers whose forward pass checkpointing reruns."""
    return {"none": 0, "full": layers, "selective": math.ceil(layers / 2)}[mode] / layers


def active_parameters(arch: Architecture) -> float:
    """Matmul weights one token passes through: attention, dense and shared MLP, router, the
    active experts' share of the routed experts, and the LM head (``flops.py``'s count)."""
    counts = arch.parameters()
    experts = counts.layer_experts * arch.active_experts / arch.experts if arch.experts > 1 else 0
    return arch.layers * (counts.layer_attention + counts.layer_mlp + experts) + arch.vocab * arch.hidden


def step_time(arch: Architecture, base: Setup, layout: Layout, *, seq_len: int, global_batch: int,
              gpus_per_node: int, hardware: Hardware) -> StepTime:
    """Predicted seconds per optimizer step of ``layout`` (module docstring, "Step time")."""
    setup = layout_setup(base, layout, seq_len, hardware.device)
    param_dtype, autocast = setup.precision()
    p = DTYPE_BYTES[param_dtype]
    mixed = setup.sharded and autocast is not None
    act = DTYPE_BYTES[autocast or param_dtype]  # activations and gathered weights (bf16 under FSDP2 mixed)
    gathered = act if mixed else p
    reduced = 4 if mixed else p

    def bandwidth(span: int) -> float:
        inside = span <= gpus_per_node and gpus_per_node % span == 0
        return hardware.intra_node_bandwidth if inside else hardware.inter_node_bandwidth

    m, b, tokens = layout.accumulation, layout.micro_batch, seq_len // layout.cp
    stage_layers = math.ceil(arch.layers / layout.pp)
    f = recompute_fraction(stage_layers, layout.activation_checkpointing)

    flops = 6 * active_parameters(arch) + 12 * arch.layers * arch.q_width * seq_len
    compute = flops * global_batch * seq_len * (1 + FORWARD_SHARE * f) / (
        layout.world_size * hardware.peak_flops * hardware.efficiency)

    tp = m * stage_layers * (4 + 2 * f) * all_reduce(act * b * tokens * arch.hidden, layout.tp,
                                                     hardware.intra_node_bandwidth)
    counts = arch.parameters()
    experts = counts.layers * counts.layer_experts
    dense = counts.total - experts
    computed = (dense + (experts if layout.ep == 1 else 0)) / (layout.tp * layout.pp)
    shards = layout.dp_shard * layout.cp
    fsdp_bandwidth = bandwidth(shards * layout.tp)
    fsdp = m * (2 * all_gather(computed * gathered, shards, fsdp_bandwidth)
                + all_gather(computed * reduced, shards, fsdp_bandwidth))
    hsdp = m * all_reduce(computed * reduced / shards, layout.dp_replicate, hardware.inter_node_bandwidth)
    kv = act * b * seq_len * 2 * arch.kv_width / layout.tp
    cp = m * stage_layers * (2 + f) * all_gather(kv, layout.cp, bandwidth(layout.cp * layout.tp))
    ep = ep_sync = 0.0
    if layout.ep > 1:
        routed = act * b * tokens * arch.active_experts * arch.hidden
        ep = m * stage_layers * 4 * all_gather(routed, layout.ep, bandwidth(layout.ep * layout.cp * layout.tp))
        ep_sync = all_reduce(experts / layout.pp / layout.ep * p, layout.dp // layout.ep,
                             bandwidth(layout.world_size // layout.pp))
    pp = 0.0
    if layout.pp > 1:
        pp = m * 2 * act * b * tokens * arch.hidden / bandwidth(layout.world_size // layout.pp * 2)
    bubble = bubble_fraction(layout.pp, m, layout.virtual_stages) if layout.pp > 1 else 0.0
    total = (compute + tp + ep + pp) / (1 - bubble) + ep_sync + max(0.0, fsdp + hsdp + cp - OVERLAP * compute)
    return StepTime(compute=compute, tp=tp, fsdp=fsdp, hsdp=hsdp, cp=cp, ep=ep, ep_sync=ep_sync, pp=pp,
                    bubble=bubble, total=total)


# -------------------------------------------------------------------------------- choice
def choose_layout(arch: Architecture, *, nodes: int, gpus_per_node: int, seq_len: int, global_batch: int,
                  hardware: Hardware | str = "h100", base: Setup | None = None, capacity: int | None = None,
                  margin: float = MEMORY_MARGIN, allowed: Iterable[str] = ("pp", "dp", "cp", "tp", "ep"),
                  checkpointing: Iterable[str] = CHECKPOINTING, virtual_stages: Iterable[int] = (1,),
                  fixed: Mapping[str, int] | None = None) -> tuple[Candidate, list[Candidate]]:
    """(the chosen candidate, every candidate considered) for ``global_batch`` sequences of
    ``seq_len`` tokens on ``nodes x gpus_per_node`` processes. ``base``: the run's other
    settings (peft, dtype, loss); ``capacity``: bytes per process (default the hardware's);
    ``allowed``: the dimensions that may exceed 1 (``dp`` = dp_replicate and dp_shard);
    ``fixed``: sizes given in advance (dimensions, ``micro_batch``), the others are chosen.

    Raises ``UserError`` when nothing fits, naming the smallest peak and what would help."""
    fixed = dict(fixed or {})
    check_fixed(fixed)
    hw = HARDWARE[hardware] if isinstance(hardware, str) else hardware
    base = base or Setup(micro_batch=1, seq_len=seq_len)
    usable = int((capacity if capacity is not None else hw.memory) * (1 - margin))
    modes = tuple(checkpointing)
    candidates: list[Candidate] = []
    for mesh, problem in mesh_shapes(arch, nodes=nodes, gpus_per_node=gpus_per_node, seq_len=seq_len,
                                     global_batch=global_batch, allowed=allowed, virtual_stages=virtual_stages,
                                     sequence_parallel=base.sequence_parallel, fixed=fixed):
        if problem:
            candidates.append(Candidate(mesh, rejected=problem))
            continue
        for layout, schedule_problem in layouts(mesh, global_batch=global_batch, checkpointing=modes,
                                                micro_batch=fixed.get("micro_batch")):
            if schedule_problem:
                candidates.append(Candidate(layout, rejected=schedule_problem))
                continue
            memory, phase = layout_memory(arch, base, layout, seq_len=seq_len, device=hw.device)
            time = step_time(arch, base, layout, seq_len=seq_len, global_batch=global_batch,
                             gpus_per_node=gpus_per_node, hardware=hw)
            rejected = (f"needs {gib(memory)} per process, {gib(usable)} usable ({phase})"
                        if memory > usable else None)
            candidates.append(Candidate(layout, memory, phase, time, rejected))
    if not any(c.fits for c in candidates):
        raise UserError(*_nothing_fits(candidates, usable, arch, nodes, gpus_per_node, seq_len, global_batch, fixed))
    return pick(candidates), candidates


def pick(candidates: list[Candidate]) -> Candidate:
    """The winner among candidates that fit: within ``TIE_TOLERANCE`` of the fastest, the fewest
    parallel dimensions, then the fastest, then ``_tie_break``."""
    fitting = [c for c in candidates if c.fits]
    fastest = min(c.time.total for c in fitting)
    near = [c for c in fitting if c.time.total <= fastest * (1 + TIE_TOLERANCE)]
    return min(near, key=lambda c: (c.layout.dimensions, *_tie_break(c)))


def _tie_break(c: Candidate) -> tuple:
    """After the step time: the least communication, the fewest micro-batches (each costs launches
    and collective latency the model leaves out), the least memory."""
    return c.time.total, c.time.communication, c.layout.accumulation, c.memory


def _nothing_fits(candidates: list[Candidate], usable: int, arch: Architecture, nodes: int, gpus_per_node: int,
                  seq_len: int, global_batch: int, fixed: Mapping[str, int] | None = None) -> tuple[str, str]:
    planned = [c for c in candidates if c.memory is not None]
    world = f"{nodes} node(s) x {gpus_per_node} process(es)"
    model = f"{arch.parameters().total / 1e9:.1f}B parameters"
    pinned = ", ".join(f"{name}={value}" for name, value in (fixed or {}).items() if name in DIMENSIONS)
    if not candidates and pinned:
        return (f"No layout of {world} has {pinned}: the sizes cannot multiply to {nodes * gpus_per_node} "
                "processes.", "Change the fixed sizes so that their product divides the number of processes, "
                "or the number of processes.")
    if not candidates:
        return (f"No layout of {world} uses only the allowed dimensions: their sizes cannot multiply to "
                f"{nodes * gpus_per_node} processes.", "Allow dp (dp_shard takes any number of processes).")
    if not planned:
        reasons = sorted({c.rejected for c in candidates if c.rejected})
        return (f"No layout of {world} can run this model ({model}) with a global batch of {global_batch} x "
                f"{seq_len} tokens: {'; '.join(reasons[:4])}.",
                "Change the global batch or the number of processes so that the data-parallel ranks divide it.")
    least = min(planned, key=lambda c: c.memory)
    return (f"No layout of {world} fits {model} at {global_batch} x {seq_len} tokens: the smallest peak, "
            f"{gib(least.memory)} per process ({least.layout.mesh_label()}, micro-batch {least.layout.micro_batch}, "
            f"{least.layout.activation_checkpointing} checkpointing), exceeds the {gib(usable)} usable.",
            "Use more processes or nodes, LoRA (--peft lora), bf16 weights (model.dtype=bfloat16), a fused loss "
            "(loss.name=linear_ce) or shorter sequences (data.max_length).")


# ------------------------------------------------------------------------------ the table
def representatives(candidates: list[Candidate]) -> list[Candidate]:
    """One candidate per mesh shape: its best micro-batch and checkpointing (the fastest that
    fits, else the smallest peak, else the first reason it cannot run)."""
    by_mesh: dict[tuple[tuple[int, ...], int], list[Candidate]] = {}
    for candidate in candidates:
        by_mesh.setdefault((candidate.layout.mesh(), candidate.layout.virtual_stages), []).append(candidate)

    def rank(c: Candidate) -> tuple:  # ties as ``pick`` breaks them
        return (not c.fits, c.memory is None,
                _tie_break(c) if c.fits else (c.memory or 0,))

    return sorted((min(group, key=rank) for group in by_mesh.values()), key=rank)


def others(best: Candidate, candidates: list[Candidate]) -> list[Candidate]:
    """``representatives`` of every mesh shape but ``best``'s."""
    mine = (best.layout.mesh(), best.layout.virtual_stages)
    return [c for c in representatives(candidates) if (c.layout.mesh(), c.layout.virtual_stages) != mine]


def describe(candidates: list[Candidate], best: Candidate | None = None, limit: int = 20) -> list[str]:
    """The candidates as a table (one row per mesh shape, its best micro-batch and checkpointing)
    and a paragraph on why the winner (``best``, else ``pick``'s) won."""
    best = best or pick(candidates)
    rows = [best] + others(best, candidates)
    width = max(len(c.layout.mesh_label()) for c in rows[:limit])
    lines = [f"{'layout':<{width}} {'micro x acc':>11} {'checkpoint':>10} {'memory/GPU':>12} {'step':>9} "
             f"{'bubble':>7}  verdict"]
    for candidate in rows[:limit]:
        layout = candidate.layout
        memory = gib(candidate.memory) if candidate.memory is not None else "-"
        seconds = f"{candidate.time.total:.3g} s" if candidate.time else "-"
        bubble = f"{candidate.time.bubble:.0%}" if candidate.time else "-"
        verdict = "chosen" if candidate is best else (candidate.rejected or "fits")
        batch = layout.batch_label() if candidate.time else "-"
        mode = layout.activation_checkpointing if candidate.time else "-"
        lines.append(f"{layout.mesh_label():<{width}} {batch:>11} {mode:>10} {memory:>12} {seconds:>9} {bubble:>7}  "
                     f"{verdict}")
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more layout(s)")
    lines.append("")
    lines.append(why(best, candidates))
    return lines


def why(best: Candidate, candidates: list[Candidate]) -> str:
    """One paragraph: what the winner costs, why the next best and the simpler layouts lost."""
    layout, time = best.layout, best.time
    rows = others(best, candidates)
    fitting = [c for c in rows if c.fits]
    costs = ", ".join(f"{name} {value:.3g} s" for name, value in time.terms().items() if value > 1e-3 * time.total)
    text = (f"Chosen: {layout.mesh_label()}, micro-batch {layout.micro_batch} x {layout.accumulation} per step, "
            f"{_checkpointing(layout)}: peak {gib(best.memory)} per process "
            f"({best.phase}), predicted {time.total:.3g} s per step ({costs}). "
            f"{len(fitting) + 1} of {len(rows) + 1} layouts fit.")
    faster = [c for c in fitting if c.time.total < time.total]
    if faster:
        rival = min(faster, key=lambda c: c.time.total)
        text += (f" {rival.layout.mesh_label()} is predicted {1 - rival.time.total / time.total:.1%} faster, within "
                 f"the {TIE_TOLERANCE:.0%} tolerance, but uses {rival.layout.dimensions} parallel dimensions "
                 f"against {layout.dimensions}: the simpler layout wins.")
    elif fitting and fitting[0].time.total <= time.total * (1 + TIE_TOLERANCE):
        rival = fitting[0]
        text += (f" {rival.layout.mesh_label()} is as fast (+{rival.time.total / time.total - 1:.1%}, within "
                 f"{TIE_TOLERANCE:.0%})")
        if rival.layout.dimensions > layout.dimensions:
            text += f" but uses {rival.layout.dimensions} parallel dimensions against {layout.dimensions}."
        else:
            text += (f" with as many parallel dimensions, but communicates more ({rival.time.communication:.3g} s "
                     f"against {time.communication:.3g} s, hidden or not).")
    elif fitting:
        text += f" The next best, {_versus(fitting[0], best)}."
    simpler = [c for c in rows if c.memory is not None and c.layout.dimensions < layout.dimensions]
    slower = [c for c in simpler if c.fits]
    if slower and fitting and slower[0] is fitting[0]:
        text += " It is also the best simpler layout."
    elif slower:
        text += f" The best simpler layout, {_versus(slower[0], best)}."
    elif simpler:
        smallest = min(simpler, key=lambda c: c.memory)
        text += (f" No simpler layout fits: the smallest of them, {smallest.layout.mesh_label()}, needs "
                 f"{gib(smallest.memory)} per process.")
    return text


def _checkpointing(layout: Layout) -> str:
    mode = layout.activation_checkpointing
    return "no activation checkpointing" if mode == "none" else f"{mode} activation checkpointing"


def _versus(other: Candidate, best: Candidate) -> str:
    """``other``'s time against ``best``'s and the term that makes most of the difference."""
    theirs, ours = other.time.terms(), best.time.terms()
    name = max(theirs, key=lambda term: theirs[term] - ours[term])
    return (f"{other.layout.mesh_label()} ({_checkpointing(other.layout)}), takes "
            f"{other.time.total:.3g} s (+{other.time.total / best.time.total - 1:.0%}): {name} "
            f"{theirs[name]:.3g} s against {ours[name]:.3g} s")
