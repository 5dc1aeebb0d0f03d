"""How much memory one process of a training run needs, from the model's config alone.

``plan(architecture, setup)`` counts, in bytes per process, what a training step holds: the
parameters, their gradients, AdamW's state, the activations kept for the backward pass (with and
without activation checkpointing), the loss's logits and the short-lived buffers (FSDP2's
all-gathers, autocast's weight copies, the optimizer step's scratch), and the peak over the
phases of a step. ``advise`` names the setting that saves the most when the peak does not fit.
No torch and no weights: the numbers come from the Hugging Face config fields, so the plan runs
on a login node before a job is submitted. docs/memory.md derives every formula; the tests
check them on hand-computed cases and ``benchmarks/memory_plan.py`` against measured peaks.

The model is a Llama-style decoder (RMSNorm, rotary attention through SDPA, gated MLP), which
covers Llama, Mistral, Qwen, Phi-3 and, approximately, Gemma. What the code does decides each
term: parameters in ``param`` bytes, gradients and AdamW moments in the parameters' own dtype
(fp32 master weights are the parameters themselves under bf16 autocast), LoRA adapters always
fp32, the LM head applied to the trained rows only, and FSDP2 sharding everything over
``dp_shard`` while computing in bf16 when mixed precision is on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from automodel_cli.components.loss.head import LOGIT_TRANSFORMS
from automodel_cli.components.loss.targets import rows_per_chunk
from automodel_cli.components.training.memory import checkpointing_mode
from automodel_cli.components.training.precision import dtype_policy

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: Linear layers of one decoder layer: name -> (in features, out features) as functions of the
#: architecture; Phi-3 fuses q/k/v and gate/up.
FUSED_MODEL_TYPES = ("phi3",)
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")
#: The routed experts' projections of a mixture of experts (``linears`` names them like a dense MLP).
EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
#: On CPU, glibc's heap keeps the forward and backward passes' freed temporaries (tensors under
#: its 32 MiB mmap threshold) in its arenas: the process's resident memory exceeds the live
#: tensors by a fraction of the activations. Measured with benchmarks/memory_plan.py
#: (docs/memory.md, "Host allocator"): 0.31-1.13 of the activations without checkpointing.
CPU_HEAP_SLACK = 0.6
#: Loss kinds the plan knows (see ``Setup.loss_kind``).
LOSS_KINDS = ("masked", "chunked", "fused")


#: Bytes per weight of a QLoRA base's decoder linear layers: NF4 is 4 bits plus an int8 scale per
#: block of 64 and a float32 factor per 256 blocks; int8 is a byte (plus a per-row scale, left out).
QUANTIZED_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0}

@dataclass(frozen=True)
class Architecture:
    """The fields of a decoder's HF config that decide its memory."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False
    experts: int = 1  # mixture of experts: experts per layer ...
    active_experts: int = 1  # ... and experts each token runs through
    shared_intermediate: int = 0  # width of a mixture of experts' shared (always-on) experts
    model_type: str = "llama"
    logit_transform: bool = False  # the model changes its logits after the head (no fused loss)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> Architecture | None:
        """From an HF config (a ``config.json`` dict or a ``PretrainedConfig``; a multimodal
        config's ``text_config`` is used); None when a field the plan needs is missing."""
        fields = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        text = fields.get("text_config")
        if isinstance(text, Mapping):
            fields = {**fields, **text}
        try:
            hidden = int(fields["hidden_size"])
            heads = int(fields.get("num_attention_heads") or 1)
            experts = int(fields.get("num_local_experts") or fields.get("num_experts")
                          or fields.get("n_routed_experts") or 1)
            # A mixture of experts' expert width (``moe_intermediate_size`` where the dense MLP of
            # some layers has another) and its always-on shared experts (Qwen2-MoE, DeepSeek).
            expert_width = int(fields.get("moe_intermediate_size") or fields.get("intermediate_size") or 4 * hidden)
            shared = int(fields.get("shared_expert_intermediate_size")
                         or (fields.get("n_shared_experts") or 0) * expert_width) if experts > 1 else 0
            return cls(
                hidden=hidden, layers=int(fields["num_hidden_layers"]), heads=heads,
                kv_heads=int(fields.get("num_key_value_heads") or heads),
                head_dim=int(fields.get("head_dim") or hidden // heads),
                intermediate=expert_width if experts > 1 else int(fields.get("intermediate_size") or 4 * hidden),
                shared_intermediate=shared,
                vocab=int(fields["vocab_size"]), tied=bool(fields.get("tie_word_embeddings")),
                experts=experts,
                active_experts=int(fields.get("num_experts_per_tok") or 1) if experts > 1 else 1,
                model_type=str(fields.get("model_type") or "llama"),
                logit_transform=any(fields.get(name) is not None for name in LOGIT_TRANSFORMS),
            )
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            return None

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """Each linear layer of one decoder layer: name -> (in features, out features); MLP
        widths count every expert (the shared experts' are ``shared_*``)."""
        h, q, kv, i = self.hidden, self.q_width, self.kv_width, self.intermediate * self.experts
        shared = ({"shared_gate_proj": (h, self.shared_intermediate), "shared_up_proj": (h, self.shared_intermediate),
                   "shared_down_proj": (self.shared_intermediate, h)} if self.shared_intermediate else {})
        if self.model_type in FUSED_MODEL_TYPES:
            return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * i), "down_proj": (i, h)}
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h), **shared}

    def parameters(self) -> Parameters:
        """Parameter counts by kind (biases are left out: under 0.1% of any preset)."""
        sizes = {name: a * b for name, (a, b) in self.linears().items()}
        attention = sum(size for name, size in sizes.items() if name in ATTENTION_LINEARS)
        routed = sum(size for name, size in sizes.items() if name in EXPERT_LINEARS) if self.experts > 1 else 0
        mlp = sum(sizes.values()) - attention - routed
        router = self.hidden * self.experts if self.experts > 1 else 0
        return Parameters(embedding=self.vocab * self.hidden, head=0 if self.tied else self.vocab * self.hidden,
                          layer_attention=attention, layer_mlp=mlp + router, layer_norms=2 * self.hidden,
                          final_norm=self.hidden, layers=self.layers, layer_experts=routed)


@dataclass(frozen=True)
class Parameters:
    """Parameter counts of a decoder by kind; ``layer_*`` are per decoder layer."""

    embedding: int
    head: int  # 0 when tied to the embedding
    layer_attention: int
    layer_mlp: int
    layer_norms: int
    final_norm: int
    layers: int
    layer_experts: int = 0  # a mixture of experts' routed experts (the router is in layer_mlp)

    @property
    def layer(self) -> int:
        return self.layer_attention + self.layer_mlp + self.layer_experts + self.layer_norms

    @property
    def total(self) -> int:
        return self.embedding + self.head + self.layers * self.layer + self.final_norm


@dataclass(frozen=True)
class Setup:
    """How the model is trained, in plain values (``training/memory_plan.py`` reads them from
    a resolved config).

    ``model_dtype`` is ``model.dtype`` (``auto``, ``float32``, ...), resolved with the device
    as the run resolves it (``precision.dtype_policy``). ``loss_kind``: ``masked`` (fp32
    ``log_softmax`` of the logits, as ``masked_ce``), ``chunked`` (``chunked_ce``) or ``fused``
    (``linear_ce``: no logits; ``fused_fallback`` is the kind used when the head cannot be
    fused). ``loss_rows``: the LM head runs on the trained positions only (every built-in loss).
    ``attention_mask``: batches carry a padding mask (finetune without packing), which SDPA
    receives as a ``[batch, 1, seq, seq]`` boolean mask and which makes grouped-query attention
    expand keys and values to every head. ``accumulation``: micro-batches per optimizer step on
    one rank (> 1: the gradients exist during every backward but the first).
    """

    micro_batch: int
    seq_len: int
    device: str = "cpu"  # cpu | cuda
    bf16_supported: bool = True  # of the GPU (auto dtype)
    model_dtype: str = "auto"
    peft: str = "none"  # none | lora | dora | qlora
    quantization: str = "nf4"  # qlora: how the decoder's linear weights are stored
    lora_rank: int = 8
    lora_targets: tuple[str, ...] | str = "all-linear"
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    ep: int = 1  # expert parallelism: routed experts split over ep of the dp_shard ranks
    cp: int = 1  # context parallelism: each sequence split over cp ranks (parameters sharded over dp_shard x cp)
    sequence_parallel: bool = False
    activation_checkpointing: str = "none"
    loss_name: str = "masked_ce"
    loss_kind: str = "masked"
    fused_fallback: str = "chunked"
    loss_rows: bool = True
    chunk_size: int | None = None
    accumulation: int = 1
    attention_mask: bool = False
    teacher: Architecture | None = None  # automodel distill: the frozen teacher
    teacher_dtype: str = "auto"
    frozen_role: str = "distill: the teacher"  # how notes name the frozen model (dpo: the reference)
    #: automodel classify: the score head's outputs (labels; 1 for a reward model). The head is
    #: ``score_labels x hidden`` instead of the vocabulary head and scores one position per
    #: sequence, so there are no vocabulary logits. 0: a language-model head.
    score_labels: int = 0
    #: the key that sets ``micro_batch`` (the advice names it): ``train.micro_batch_size``, or
    #: ``benchmark.batch_size`` for the benchmark
    micro_batch_key: str = "train.micro_batch_size"

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp_size * self.cp * self.tp

    @property
    def sharded(self) -> bool:
        """FSDP2 wraps the model (more than one data-parallel or context-parallel rank)."""
        return self.dp_size * self.cp > 1

    @property
    def local_tokens(self) -> float:
        """Tokens of a micro-batch on one process: a context-parallel rank holds 1/cp of each row."""
        return self.micro_batch * self.seq_len / self.cp

    def precision(self) -> tuple[str, str | None]:
        """(parameter dtype, autocast dtype or None), as ``Precision.choose`` picks them."""
        return dtype_policy(self.model_dtype, self.peft, self.device, bf16=self.bf16_supported, sharded=self.sharded)


@dataclass
class MemoryPlan:
    """Bytes per process of one training step (see the module docstring); ``phase`` says
    when the peak happens."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int  # with the configured activation checkpointing
    activations_none: int  # without checkpointing
    activations_full: int  # with full checkpointing
    logits: int  # the loss's logits and their gradients at their largest
    transient: int  # FSDP all-gathers, autocast weight copies (during forward/backward)
    optimizer_scratch: int  # AdamW's foreach scratch during the optimizer step
    allocator_slack: int  # CPU: freed memory glibc's heap keeps (during forward/backward)
    teacher: int  # distill: the frozen teacher's weights
    peak: int
    phase: str
    phases: dict[str, int]
    trainable: int  # trainable parameters on this process
    total_parameters: int  # of the whole model
    param_dtype: str
    autocast_dtype: str | None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------- the plan
def plan(arch: Architecture, setup: Setup) -> MemoryPlan:
    """The memory of one process of a training step (docs/memory.md has the formulas)."""
    param_dtype, autocast_dtype = setup.precision()
    p = DTYPE_BYTES[param_dtype]
    c = DTYPE_BYTES[autocast_dtype] if autocast_dtype else p  # the dtype matmuls compute in
    mixed = setup.sharded and autocast_dtype is not None  # FSDP2 computes in bf16 ...
    r = c if mixed else p  # ... so its residual stream is bf16 too
    casts = r != c  # autocast copies fp32 tensors into bf16 for every matmul
    counts = arch.parameters()
    if setup.score_labels:  # sequence classification: a score head replaces the vocabulary head
        counts = replace(counts, head=setup.score_labels * arch.hidden)
    shard, tp = setup.dp_shard * setup.cp, setup.tp  # FSDP shards over dp_shard x cp
    vocab_tp = tp if arch.vocab % tp == 0 else 1
    peft = setup.peft != "none"
    notes: list[str] = []

    # Parameters, gradients, optimizer state.
    layer_matrices = (counts.layer_attention + counts.layer_mlp) / tp
    # Routed experts: FSDP-sharded with the rest, or under expert parallelism split ep ways and
    # whole on the dp_shard / ep ranks that hold the same experts; never split by tp.
    experts = counts.layers * counts.layer_experts / (setup.ep if setup.ep > 1 else shard)
    base = (counts.layers * (layer_matrices + counts.layer_norms) + (counts.embedding + counts.head) / vocab_tp
            + counts.final_norm) / shard + experts
    adapter_total = adapter_parameters(arch, setup) if peft else 0
    adapters = adapter_total / shard
    parameters = base * p + adapters * 4  # peft keeps adapters in fp32
    if setup.peft == "qlora":  # the decoder's linear weights stored quantized, not in the parameter dtype
        parameters -= counts.layers * layer_matrices / shard * (p - QUANTIZED_BYTES[setup.quantization])
    trainable_bytes = adapters * 4 if peft else base * p
    trainable = adapters if peft else base
    gradients = trainable_bytes
    optimizer = 2 * trainable_bytes  # AdamW: exp_avg and exp_avg_sq, in the parameter's dtype
    optimizer_scratch = trainable_bytes  # foreach AdamW: sqrt(exp_avg_sq) for every tensor

    # Activations kept for backward (bytes).
    tokens = setup.local_tokens
    layer = layer_activations(arch, setup, r=r, c=c, casts=casts) * tokens
    if setup.cp > 1:  # the layer's all-gathered keys and values, repeated to the query heads, kept for SDPA's backward
        layer += 2 * setup.micro_batch * setup.seq_len * arch.q_width / tp * c
    kept_input = r * arch.hidden / (tp if setup.sequence_parallel else 1) * tokens  # a checkpointed layer's input
    outside = outside_activations(arch, setup, r=r, c=c, casts=casts) * tokens
    if setup.cp > 1:  # the context-parallel boolean [batch, 1, seq / cp, seq] mask, always built
        outside += setup.micro_batch * setup.seq_len ** 2 / setup.cp
    elif setup.attention_mask:
        outside += setup.micro_batch * setup.seq_len ** 2  # SDPA's boolean [batch, 1, seq, seq] mask
    # With adapters, the first layer's input needs no gradient: its first norm saves nothing.
    first_layer_input = 4 * arch.hidden / (tp if setup.sequence_parallel else 1) * tokens if peft else 0
    mode = checkpointing_mode(setup.activation_checkpointing)

    def checkpointed_layers(ac_mode: str) -> int:
        return {"none": 0, "full": arch.layers, "selective": math.ceil(arch.layers / 2)}[ac_mode]

    def activations_for(ac_mode: str) -> tuple[int, int]:
        """(activations kept at the end of the forward pass, the same while a checkpointed
        layer is recomputed) with checkpointing ``ac_mode`` (selective: layers 0, 2, 4, ...)."""
        checkpointed = checkpointed_layers(ac_mode)
        kept = outside + checkpointed * kept_input + (arch.layers - checkpointed) * layer
        kept -= first_layer_input if checkpointed == 0 else 0
        return int(kept), int(kept + (layer if checkpointed else 0))

    activations, recompute = activations_for(mode)

    # Autocast's copies of fp32 weights are kept from their forward use until their backward
    # (one process only: FSDP2's mixed precision gathers bf16 weights instead), except in
    # checkpointed layers, whose forward keeps nothing.
    weight_copies = 0
    if casts and not setup.sharded:
        head = 0 if (setup.loss_kind == "fused" and _fusable(arch, setup)) else arch.vocab * arch.hidden
        head = counts.head if setup.score_labels else head
        weight_copies = c * ((arch.layers - checkpointed_layers(mode)) * layer_matrices + head)

    # FSDP2: the root (embedding, head, final norm) stays gathered through forward and backward;
    # two decoder layers are gathered at a time, and a layer's unsharded gradients are
    # reduce-scattered (in fp32 under mixed precision).
    gathered = 0
    if setup.sharded:
        g = c if mixed else p
        root = ((counts.embedding + counts.head) / vocab_tp + counts.final_norm) * g
        layer_params = layer_matrices + counts.layer_norms + (counts.layer_experts if setup.ep == 1 else 0)
        layer_grads = adapter_total / max(arch.layers, 1) * 4 if peft else layer_params * (g + (4 if mixed else 0))
        gathered = root + 2 * layer_params * g + layer_grads

    # The loss. The head's gradient appears during its backward (unless an earlier micro-batch
    # of the step made it already).
    accumulated = gradients if setup.accumulation > 1 else 0
    head_grad = 0 if (peft or accumulated) else (counts.head or counts.embedding) / vocab_tp / shard * p
    logits, logits_saved = loss_memory(arch, setup, r=r, c=c, p=p, head_grad=head_grad, notes=notes)

    # Distillation: the frozen teacher's weights (sharded like the student) and its logits.
    teacher = 0
    if setup.teacher is not None:
        t_dtype, _ = dtype_policy(setup.teacher_dtype, "none", setup.device, bf16=setup.bf16_supported, sharded=False)
        t_bytes = DTYPE_BYTES[t_dtype]
        teacher = setup.teacher.parameters().total / shard * t_bytes
        logits += tokens * setup.teacher.vocab * t_bytes
        notes.append(f"{setup.frozen_role}'s weights and its logits of the trained rows are included; "
                     "the loss's temporaries are not")

    activations_none = activations_for("none")[0]
    allocator_slack = int(CPU_HEAP_SLACK * activations_none) if setup.device == "cpu" else 0
    fwd_bwd = parameters + optimizer + teacher + accumulated + weight_copies + gathered + allocator_slack
    phases = {
        "loss backward": fwd_bwd + activations + logits,
        "optimizer step": parameters + teacher + gradients + optimizer + optimizer_scratch,
    }
    if mode != "none":
        phases["layer recompute"] = fwd_bwd + recompute + logits_saved + head_grad
    phase = max(phases, key=lambda name: phases[name])
    return MemoryPlan(
        parameters=int(parameters), gradients=int(gradients), optimizer=int(optimizer), activations=activations,
        activations_none=activations_none, activations_full=activations_for("full")[0],
        logits=int(logits), transient=int(weight_copies + gathered), optimizer_scratch=int(optimizer_scratch),
        allocator_slack=allocator_slack,
        teacher=int(teacher), peak=int(phases[phase]), phase=phase, phases={k: int(v) for k, v in phases.items()},
        trainable=int(trainable), total_parameters=counts.total, param_dtype=param_dtype,
        autocast_dtype=autocast_dtype, notes=notes)


def adapter_parameters(arch: Architecture, setup: Setup) -> int:
    """LoRA parameters of the whole model: ``rank * (in + out)`` per adapted linear layer
    (DoRA adds a magnitude per output feature); ``all-linear`` adapts every linear layer of
    the decoder layers, not the LM head."""
    adapted = adapted_linears(arch, setup.lora_targets)
    per_layer = sum(setup.lora_rank * (a + b) + (b if setup.peft == "dora" else 0) for a, b in adapted.values())
    return per_layer * arch.layers


def adapted_linears(arch: Architecture, targets: tuple[str, ...] | str) -> dict[str, tuple[int, int]]:
    linears = arch.linears()
    if isinstance(targets, str):
        targets = tuple(linears) if targets == "all-linear" else (targets,)
    return {name: shape for name, shape in linears.items() if name in targets}


def layer_activations(arch: Architecture, setup: Setup, *, r: int, c: int, casts: bool) -> float:
    """Bytes one decoder layer keeps for backward, per token (docs/memory.md, "Activations").

    ``r``: bytes of the residual stream (the parameters' dtype, bf16 under FSDP2 mixed
    precision); ``c``: bytes of what matmuls produce (the autocast dtype, else ``r``);
    ``casts``: autocast copies the residual-dtype inputs of each matmul."""
    h, a, tp = arch.hidden, arch.heads, setup.tp
    sp = tp if setup.sequence_parallel else 1
    norm_weights = setup.peft == "none"
    # Two RMSNorms: the fp32 input (the residual itself in fp32) and, for a trainable weight,
    # the normalised input.
    norms = 2 * (4 * h + (r * h if norm_weights else 0))
    # The normed inputs of the attention and MLP matmuls: once each, or one bf16 copy per matmul
    # (q, k, v; gate, up) under autocast.
    matmul_inputs = 5 * c * h if casts else 2 * r * h
    expanded = setup.attention_mask and arch.kv_heads < arch.heads  # repeat_kv for masked SDPA
    kv = arch.q_width if expanded else arch.kv_width
    # q, k, v after RoPE; SDPA's output (o_proj's input shares it) and its fp32 log-sum-exp.
    attention = c * (arch.q_width + 2 * kv) + c * arch.q_width + 4 * a
    # gate, silu(gate), up and their product (down_proj's input).
    mlp = 4 * c * (arch.intermediate * arch.active_experts + arch.shared_intermediate)
    if arch.experts > 1:  # the tokens sorted by expert (each token once per active expert) and their outputs
        mlp += 2 * c * h * arch.active_experts
    lora = 0
    if setup.peft != "none":
        lora = c * setup.lora_rank * len(adapted_linears(arch, setup.lora_targets))  # lora_A's output
    return (norms + matmul_inputs) / sp + (attention + mlp) / tp + lora


def outside_activations(arch: Architecture, setup: Setup, *, r: int, c: int, casts: bool) -> float:
    """Bytes per token kept outside the decoder layers: rotary cos/sin, the final norm and the
    head's input rows (a frozen head keeps none; the fused loss keeps its own)."""
    h = arch.hidden
    head_trainable = setup.peft == "none"
    rotary = 2 * r * arch.head_dim
    final_norm = 4 * h + (r * h if head_trainable else 0)
    fused = setup.loss_kind == "fused" and _fusable(arch, setup)
    head_input = (c if casts else r) * h if head_trainable and not fused else 0
    return rotary + final_norm + head_input


def loss_memory(arch: Architecture, setup: Setup, *, r: int, c: int, p: int, head_grad: float,
                notes: list[str]) -> tuple[float, float]:
    """(the loss's largest footprint, what it keeps from forward to backward), in bytes, for
    every position of the micro-batch trained (the upper bound); docs/memory.md, "The loss".

    ``masked``: the fp32 ``log_softmax`` is kept; in backward its gradient and the logits'
    gradient exist next to it (12 bytes per logit), then the logits' gradient next to the
    head's (``head_grad``). ``chunked``: the logits (``c`` bytes) are kept; forward upcasts one
    chunk and ``logsumexp`` makes two fp32 temporaries of it; backward writes the gradient into
    one tensor of the logits' dtype, one fp32 chunk at a time. ``fused``: no logits; the head's
    fp32 weight gradient and the hidden states' gradient are built in forward, next to one
    chunk of fp32 logits and ``logsumexp``'s two temporaries (and a copy of the head in the
    autocast dtype over fp32 weights). A tensor-parallel head also holds its shard of the
    logits before they are gathered."""
    if setup.score_labels:  # one fp32 score per label of each sequence's last token (and its gradient)
        saved = 4 * setup.micro_batch * setup.score_labels
        return 2 * saved + head_grad, saved
    rows = setup.local_tokens
    vocab = arch.vocab
    kind = setup.loss_kind
    if kind == "fused" and not _fusable(arch, setup):
        kind = setup.fused_fallback
        notes.append(f"{setup.loss_name} cannot fuse the head here ({_unfusable_reason(arch, setup)}): "
                     f"counted as its fallback ({kind})")
    shard = c * rows * vocab / setup.tp if setup.tp > 1 else 0
    chunk = min(rows, rows_per_chunk(setup.chunk_size, vocab)) * vocab  # values in one chunk
    upcast = 4 if c != 4 else 0  # an fp32 copy of a chunk of bf16 logits
    if kind == "masked":
        saved = 4 * rows * vocab
        return shard + max(12 * rows * vocab, saved + head_grad), saved
    if kind == "chunked":
        saved = c * rows * vocab + 4 * rows
        forward = saved + (upcast + 8) * chunk
        backward = saved + c * rows * vocab + (upcast + 4) * chunk
        return shard + max(forward, backward, c * rows * vocab + head_grad), saved
    weight_grad = 4 * vocab * arch.hidden if setup.peft == "none" else 0
    saved = weight_grad + r * rows * arch.hidden
    head_copy = c * vocab * arch.hidden if c != p else 0
    return saved + 12 * chunk + head_copy, saved


def _fusable(arch: Architecture, setup: Setup) -> bool:
    return _unfusable_reason(arch, setup) is None


def _unfusable_reason(arch: Architecture, setup: Setup) -> str | None:
    if arch.logit_transform:
        return "the model changes its logits after the head"
    if setup.tp > 1:
        return "the head is tensor-parallel"
    return None


# ------------------------------------------------------------------------------- the advice
@dataclass(frozen=True)
class Knob:
    """One setting the advice may suggest and what the plan becomes with it."""

    setting: str  # as the user writes it: "--peft lora", "loss.name=linear_ce"
    peak: int
    saving: int
    fits: bool | None


def knobs(arch: Architecture, setup: Setup, capacity: int | None) -> list[Knob]:
    """The plan again with each setting that lowers memory changed, largest saving first."""
    before = plan(arch, setup).peak
    candidates: list[tuple[str, Setup]] = []
    if setup.peft == "none":
        candidates.append(("--peft lora", replace(setup, peft="lora")))
    shards = setup.dp_shard * 2
    candidates.append((f"distributed.dp_shard={shards} (twice the processes: --nproc-per-node or --nodes)",
                       replace(setup, dp_shard=shards)))
    if checkpointing_mode(setup.activation_checkpointing) != "full":
        candidates.append(("train.activation_checkpointing=full", replace(setup, activation_checkpointing="full")))
    if setup.micro_batch > 1:
        half = setup.micro_batch // 2
        candidates.append((f"{setup.micro_batch_key}={half}",
                           replace(setup, micro_batch=half, accumulation=setup.accumulation * 2)))
    if setup.loss_kind != "fused" and _fusable(arch, setup) and not setup.score_labels:
        candidates.append(("loss.name=linear_ce", replace(setup, loss_name="linear_ce", loss_kind="fused")))
    found = []
    for setting, changed in candidates:
        peak = plan(arch, changed).peak
        found.append(Knob(setting, peak, before - peak, None if capacity is None else peak <= capacity))
    return sorted(found, key=lambda knob: -knob.saving)


def advise(arch: Architecture, setup: Setup, capacity: int) -> Knob | None:
    """The setting with the largest saving among those that make the plan fit ``capacity``
    bytes, else the largest saving; None when nothing saves anything."""
    found = [knob for knob in knobs(arch, setup, capacity) if knob.saving > 0]
    fitting = [knob for knob in found if knob.fits]
    return (fitting or found or [None])[0]


# ------------------------------------------------------------------------------ the table
def gib(value: float) -> str:
    """``value`` bytes in GiB: two decimals, or three significant digits under 1 GiB (a tiny
    model's terms are not all 0.00)."""
    value /= GIB
    return f"{value:.2f} GiB" if value >= 1 or value == 0 else f"{value:.3g} GiB"


def table(result: MemoryPlan, setup: Setup) -> list[str]:
    """The plan as aligned lines: one per term, then the peak."""
    mode = checkpointing_mode(setup.activation_checkpointing)
    rows = [
        ("parameters", result.parameters, f"{result.total_parameters / 1e6:,.2f}M in the model, "
                                          f"{result.param_dtype}" + (f", {result.autocast_dtype} autocast"
                                                                     if result.autocast_dtype else "")
                                          + (f", decoder linear weights {setup.quantization}"
                                             if setup.peft == "qlora" else "")),
        ("gradients", result.gradients, f"{result.trainable / 1e6:,.2f}M trainable on this process"),
        ("optimizer state", result.optimizer, "AdamW: 2 moments per trainable parameter"),
        ("activations", result.activations_none, "no checkpointing" + (" <- this run" if mode == "none" else "")),
        ("activations", result.activations_full, "full checkpointing" + (" <- this run" if mode == "full" else "")),
    ]
    if mode == "selective":
        rows.append(("activations", result.activations, "selective checkpointing <- this run"))
    rows += [
        ("score head", result.logits, f"{setup.score_labels} score(s) of each sequence's last token, "
                                      f"micro-batch {setup.micro_batch}")
        if setup.score_labels else
        ("loss logits", result.logits, f"{setup.loss_name}, {setup.micro_batch} x {setup.seq_len} tokens"),
        ("transient", result.transient, "forward/backward: FSDP2 all-gathers, autocast weight copies"),
        ("optimizer step", result.optimizer_scratch, "AdamW's scratch (foreach)"),
    ]
    if result.allocator_slack:
        rows.append(("host allocator", result.allocator_slack, "freed memory the C heap keeps (CPU)"))
    if result.teacher:
        rows.append(("teacher weights", result.teacher, "frozen"))
    rows.append(("peak", result.peak, f"during the {result.phase}"))
    return [f"{name:<16} {gib(value):>12}  {note}" for name, value, note in rows]
