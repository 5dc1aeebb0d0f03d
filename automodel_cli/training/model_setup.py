"""Turn a loaded model into the model a recipe trains, as the config says."""

from __future__ import annotations

import contextlib
from typing import Any

from automodel_cli.run_layout import RunDir


def init_device(cfg: Any, device: Any) -> Any:
    """Context to build the model in: random weights are created directly on the training
    device (a GPU initialises an 8B model in seconds, and no rank holds a CPU copy); weights
    loaded from disk go through the usual CPU path."""
    import torch

    if cfg.model.from_scratch and device.type != "cpu":
        return torch.device(device)
    return contextlib.nullcontext()


def save_random_base(cfg: Any, tokenizer: Any, directory: Any, dtype: Any, model_cfg: Any = None) -> None:
    """Write the random base weights a sharded run of ``model.from_scratch`` starts from (the
    same values: they are seeded per parameter) as a Hugging Face directory, built whole on this
    CPU: an adapter trained on a random base needs them (a corner case; the whole model is small
    enough to hold when anyone trains adapters on random weights)."""
    import torch

    from types import SimpleNamespace

    one = SimpleNamespace(device=torch.device("cpu"), autocast_dtype=None)
    model = build_model(cfg, model_cfg or cfg.model, precision=one, mesh=None, shape=SimpleNamespace(tp=1), registries=None,
                        sequence_parallel=False, dtype=dtype, trainable=False, say=lambda _: None)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def adapter_base(model: Any, tokenizer: Any, cfg: Any, output_dir: Any, is_main: bool) -> str:
    """Where the base weights of the trained model live, for adapter outputs and merges.

    An adapter needs its base weights: a random base (``model.from_scratch`` with LoRA/DoRA)
    exists nowhere else, so rank 0 saves it as ``OUTPUT_DIR/base_model`` before training."""
    from automodel_cli.components.models.loading import resolve_model_source
    from automodel_cli.components.training import run_lock

    if not (cfg.model.from_scratch and cfg.peft.method != "none"):
        return resolve_model_source(cfg.model.path)
    base_dir = RunDir(output_dir).base_model
    if is_main:
        run_lock.mark_writing(output_dir)
        model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
    return str(base_dir.resolve())


def prepare_model(model: Any, cfg: Any, *, precision: Any, mesh: Any, shape: Any, registries: Any,
                  sequence_parallel: bool = False, on_meta: bool = False, say: Any = None) -> Any:
    """Activation checkpointing, the frozen parts of a vision-language model (model.freeze_vision,
    model.freeze_projector), adapters (peft.method), float8 linear layers (train.precision=fp8),
    device, torch.compile and, on several
    processes, the tensor-parallel plan and FSDP2; returns the model in train mode. A model still
    on the meta device (``on_meta``) stays there: ``materialize`` allocates its shards after."""
    from automodel_cli.components.distributed.parallelize import parallelize_model
    from automodel_cli.components.peft.quantize import unshardable_weights
    from automodel_cli.config.compose import entry_options
    from automodel_cli.components.models.vlm import apply_freezing
    from automodel_cli.components.peft.lora import apply_peft
    from automodel_cli.components.training.memory import compile_decoder_layers, enable_activation_checkpointing

    distributed = mesh is not None
    if not distributed:
        enable_activation_checkpointing(model, cfg.train.activation_checkpointing)
    apply_freezing(model, freeze_vision=cfg.model.freeze_vision, freeze_projector=cfg.model.freeze_projector)
    _quantize_base(model, cfg, mesh=mesh, say=say)
    model = apply_peft(model, cfg.peft, ep=cfg.distributed.ep, say=say)
    _install_experts(model, registries, cfg.model.experts_kernel, precision)
    _convert_float8(model, cfg, sharded=distributed, say=say)
    if not on_meta:
        model.to(precision.device)
    model.train()
    if cfg.train.compile and not distributed:
        compile_decoder_layers(model, cfg.train.compile_backend)
    if getattr(shape, "cp", 1) > 1:  # before FSDP wraps it: every layer attends across the cp group
        from automodel_cli.components.distributed.context_parallel import use_context_parallel_attention

        use_context_parallel_attention(model)
    if distributed:
        model = parallelize_model(
            model, mesh, plan_registry=registries.parallel_plans, tp=shape.tp,
            plan_options=lambda model_type: entry_options(cfg, registries.parallel_plans, model_type),
            sequence_parallel=sequence_parallel,
            activation_checkpointing=cfg.train.activation_checkpointing,
            mixed_precision=precision.autocast_dtype is not None,
            compile=cfg.train.compile, compile_backend=cfg.train.compile_backend, ep=getattr(shape, "ep", 1),
            pipeline=getattr(shape, "pp", 1) > 1,
            unshardable=unshardable_weights if cfg.peft.method == "qlora" else None)
    return model


def _quantize_base(model: Any, cfg: Any, *, mesh: Any, say: Any) -> None:
    """``peft.method=qlora``: the decoder's linear layers store their frozen weights quantized
    (``components/peft/quantize.py``); on the meta device each is filled as it is read. On several
    processes, says which quantized weights stay whole on every process (FSDP2 cannot cut them
    into whole quantization blocks)."""
    from automodel_cli.components.distributed.mesh import fsdp_mesh
    from automodel_cli.components.peft import quantize

    if cfg.peft.method != "qlora":
        return
    count = quantize.quantize_decoder(model, cfg.peft.quantization)
    if say is None:
        return
    say(f"qlora: {count} decoder linear layers hold their frozen weights in {cfg.peft.quantization}")
    dp = fsdp_mesh(mesh)
    whole = quantize.unshardable_weights(model, dp.shape[-1]) if dp is not None else set()
    if whole:
        shapes = sorted({tuple(weight.shape) for weight in whole})
        say(f"note: qlora: {len(whole)} quantized weights (shapes {', '.join(map(str, shapes))}) do not split into "
            f"whole {cfg.peft.quantization} blocks over {dp.shape[-1]} processes: each process keeps them whole")


def _convert_float8(model: Any, cfg: Any, *, sharded: bool, say: Any) -> None:
    """``train.precision=fp8``: the decoder's linear layers become torchao float8 layers, after
    the adapters are attached (only their frozen base layers convert) and before torch.compile
    and FSDP2 (``components/training/float8.py``)."""
    from automodel_cli.components.training import float8

    if not float8.enabled(cfg):
        return
    count = float8.convert(model, cfg.train.fp8_recipe, sharded=sharded)
    if say is not None:
        say(float8.describe(count, cfg.train.fp8_recipe, sharded))


def _install_experts(model: Any, registries: Any, kernel: str, precision: Any) -> None:
    """The experts forward of every mixture-of-experts layer (``components/moe/experts.py``):
    grouped GEMM or per-expert loop as ``model.experts_kernel`` says, expert parallelism once
    ``parallelize_model`` splits the experts. Kinds come from the ``moe-blocks`` registry (the
    built-in one when there are no registries)."""
    from automodel_cli.components.moe.experts import HF_FUSED, install_experts, moe_kinds

    registry = getattr(registries, "moe_blocks", None)
    kinds = moe_kinds(registry) if registry is not None else [HF_FUSED]
    install_experts(model, kinds, kernel, device=precision.device)


# ----------------------------------------------------------------- sharded construction
def weight_files(model_cfg: Any) -> list[Any] | None:
    """The safetensors files of ``model_cfg.path`` (local, or the hub's, downloaded once into the
    cache), each checked whole, or None when the model has none (only ``.bin`` weights): it then
    loads the old way. A shard the index names but the directory lacks is a ``UserError``."""
    import os
    from pathlib import Path

    from automodel_cli.components.models import model_files
    from automodel_cli.components.models.loading import resolve_model_source, role_of, source_access

    role = role_of(model_cfg)
    source = resolve_model_source(model_cfg.path, role)
    if not os.path.isdir(source):
        from huggingface_hub import snapshot_download

        access = source_access(source, model_cfg.revision, role.path_key)
        source = snapshot_download(source, revision=model_cfg.revision, allow_patterns=["*.safetensors", "*.json"],
                                   local_files_only=bool(access.get("local_files_only")))
        if not any(Path(source).glob("*.safetensors")):
            return None  # a hub model with .bin weights only
    files = model_files.weight_files(Path(source), model_cfg.path, role)
    if any(path.suffix != ".safetensors" for path in files):
        return None
    for path in files:
        model_files.check_weight_file(path, model_cfg.path, role)
    return files


def build_model(cfg: Any, model_cfg: Any, *, precision: Any, mesh: Any, shape: Any, registries: Any,
                sequence_parallel: bool, dtype: Any, trainable: bool, say: Any,
                on_empty: Any = None, pipeline: Any = None) -> Any:
    """The model as the run trains (or, ``trainable=False``, runs) it, built without ever
    holding it whole: on the meta device, with activation checkpointing and adapters (when
    ``trainable``), the tensor-parallel plan and FSDP2 applied while empty, then each process's
    shards allocated and filled from the safetensors files (or seeded per parameter for
    ``model.from_scratch``). A model this path cannot take (only ``.bin`` weights, keys that
    are not the architecture's, or ``model.meta_init=false``) is loaded whole in every process
    and sharded afterwards. ``on_empty(model)`` sees the bare model before anything wraps it
    (to count FLOPs). ``pipeline`` (a ``training.pipeline.PipelinePlan``) cuts the model down to
    this rank's stages before anything else. Says one line: how many parameter bytes each
    process allocated."""
    from automodel_cli.components.models import materialize as meta
    from automodel_cli.components.models.heads import new_head_keys
    from automodel_cli.components.models.joined import joined_layout
    from automodel_cli.components.models.loading import load_config, load_model

    import time

    config = load_config(model_cfg)
    _import_model_code(config, trainable and cfg.peft.method != "none")
    started = (time.perf_counter(), resident_bytes())  # after imports: the growth is the model's
    seed = cfg.train.seed
    files = None if model_cfg.from_scratch else weight_files(model_cfg)

    def whole(note: str | None) -> Any:
        if note:
            say(f"note: {note}: every process loads the whole model before sharding")
        model = load_model(model_cfg, seed=seed, dtype=dtype)
        if on_empty is not None:
            on_empty(model)
        if pipeline is not None:
            pipeline.trim(model)
        model = _prepare(model, cfg, precision, mesh, shape, registries, sequence_parallel, trainable, say=say)
        _report_load(model, "loaded whole in every process, then sharded", mesh, say, started, whole=True)
        return model

    if not model_cfg.meta_init:
        return whole(None)
    if not model_cfg.from_scratch and files is None:
        return whole("the model has no safetensors weights")
    model = _empty_model(config, model_cfg, dtype)
    if on_empty is not None:
        on_empty(model)
    # A pipeline rank's part; a tied LM head whose embedding went to another stage reads the
    # embedding's tensor (the checkpoint stores the tied weight once).
    tied_elsewhere = pipeline.trim(model) if pipeline is not None else {}
    read = init = None
    if files is not None:
        reader = meta.CheckpointReader(files)
        shapes = {meta.checkpoint_key(name): tuple(param.shape) for name, param in model.named_parameters()}
        new_head = new_head_keys(model, list(shapes), reader.keys())  # a task head on a causal LM's weights
        expected = [key for key in shapes if key not in new_head]
        mapping = meta.key_mapping(expected, reader.keys(), getattr(model, "base_model_prefix", ""),
                                   {**meta.saved_names(model, expected), **tied_elsewhere},
                                   joined=lambda key: joined_layout(model, key, shapes[key]))
        if mapping is None:
            from automodel_cli.components.models.structure import num_experts

            if num_experts(config):
                return whole("the checkpoint stores its experts in a layout the shard-by-shard reader cannot "
                             "join into the model's stacked experts")
            return whole("the checkpoint's tensor names are not this architecture's")
        _check_shapes(model, reader, mapping)
        read = lambda key, offset, local: meta.read_mapped(reader, mapping[key], offset, local)  # noqa: E731
        how = f"read shard by shard from {len(files)} safetensors file{'s' * (len(files) > 1)}"
        if new_head:
            read = _with_new_head(read, new_head, meta.SeededInit(_empty_model(config, model_cfg, dtype), seed))
            how += f" (new head {', '.join(sorted(new_head))}: initialised at random, seeded per parameter)"
    else:
        seeded = meta.SeededInit(_empty_model(config, model_cfg, dtype), seed)
        init = (lambda key: seeded(tied_elsewhere.get(key, key))) if tied_elsewhere else seeded  # noqa: E731
        how = "initialised shard by shard, seeded per parameter"
    model = _prepare(model, cfg, precision, mesh, shape, registries, sequence_parallel, trainable, on_meta=True,
                     say=say)
    meta.materialize(model, precision.device, read=read, init=init, adapter_seed=seed)
    model.train(trainable)
    _report_load(model, how, mesh, say, started, whole=False)
    return model


def _with_new_head(read: Any, new_head: set[str], seeded: Any) -> Any:
    """``read`` for the checkpoint's tensors, a seeded random slice for the parameters of a task
    head the checkpoint lacks (``heads.new_head_keys``): the same values on any mesh."""
    from automodel_cli.components.models import materialize as meta

    def read_or_init(key: str, offset: tuple[int, ...], local: tuple[int, ...]) -> Any:
        if key in new_head:
            return meta.slice_of(seeded(key), offset, local)
        return read(key, offset, local)

    return read_or_init


def _empty_model(config: Any, model_cfg: Any, dtype: Any) -> Any:
    """The architecture of ``config`` on the meta device (no memory), or a ``UserError`` when its
    construction needs real tensors (``model.meta_init=false`` then loads it whole)."""
    from automodel_cli.components.models import materialize as meta
    from automodel_cli.components.models.vlm import auto_class
    from automodel_cli.errors import UserError

    kwargs: dict[str, Any] = {"trust_remote_code": model_cfg.trust_remote_code}
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    try:
        with meta.parameters_on_meta():
            return auto_class(config).from_config(config, dtype=dtype, **kwargs)
    except (NotImplementedError, RuntimeError, TypeError, ValueError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"The {config.model_type} model of `{model_cfg.path}` (config.json) cannot be built on the meta "
            f"device, where each process allocates only its own shards: {detail}.",
            "Set model.meta_init=false to build the whole model in every process before sharding it "
            "(one full copy of the model per process).",
        ) from None


def _import_model_code(config: Any, adapters: bool) -> None:
    """Import the architecture's modelling code (and peft) now, so the memory they take is not
    counted as the model's."""
    from automodel_cli.components.models.vlm import auto_class

    mapping = getattr(auto_class(config), "_model_mapping", None)
    try:
        if mapping is not None:
            mapping[type(config)]
    except (KeyError, ValueError, ImportError):  # custom code: imported when it is built
        pass
    if adapters:
        import peft  # noqa: F401


def resident_bytes() -> int:
    """This process's resident memory now (VmRSS; the peak so far where /proc is missing)."""
    import resource

    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _report_load(model: Any, how: str, mesh: Any, say: Any, started: tuple[float, int], *, whole: bool) -> None:
    """One line from the main process: how the weights were built and how long it took, the
    most parameter bytes any process allocated (the whole model on the old path) of the model's
    total, and the largest process's peak host memory and its growth while the model was built."""
    import resource
    import time

    import torch

    from automodel_cli.components.checkpoint.describe import human_size
    from automodel_cli.components.models import materialize as meta

    total = local = 0
    for param in model.parameters():
        total += param.numel() * param.element_size()
        part = meta.local_part(param)[0]
        local += part.numel() * part.element_size()
    allocated = total if whole else local
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mine = (allocated, peak, max(0, peak - started[1]))
    if mesh is not None and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, mine)
        mine = tuple(max(values) for values in zip(*gathered))
    allocated, peak, growth = mine
    say(f"weights: {how} in {time.perf_counter() - started[0]:.1f} s; parameters per process: {human_size(allocated)} "
        f"of {human_size(total)}; host memory: peak {human_size(peak)}, +{human_size(growth)} while building "
        f"(largest process)")


def _check_shapes(model: Any, reader: Any, mapping: dict[str, Any]) -> None:
    """Every checkpoint tensor has the shape the config gives its parameter (before any shard is
    allocated): a mismatch names the file and the tensor."""
    from automodel_cli.components.models import materialize as meta
    from automodel_cli.errors import UserError

    for name, param in model.named_parameters():
        source = mapping.get(meta.checkpoint_key(name))
        if source is None:  # a new task head (``heads.new_head_keys``): not in the checkpoint
            continue
        if isinstance(source, str):
            found = [(source, tuple(param.shape))]
        else:  # per-expert tensors joined into this one
            found = [(block.key(expert), block.shape[::-1] if block.transposed else block.shape)
                     for expert in range(source.experts) for block in source.blocks]
        key, wanted = next(((key, wanted) for key, wanted in found if reader.shape(key) != wanted), (None, None))
        if key is not None:
            raise UserError(
                f"Tensor `{key}` in {reader.where[key]} has shape {list(reader.shape(key))}, but the model's "
                f"config gives it {list(wanted)}: the weights do not belong to this config.",
                "Check model.path, and model.config overrides that change layer sizes (they cannot apply to "
                "trained weights).",
            )


def _prepare(model: Any, cfg: Any, precision: Any, mesh: Any, shape: Any, registries: Any,
             sequence_parallel: bool, trainable: bool, on_meta: bool = False, say: Any = None) -> Any:
    if trainable:
        return prepare_model(model, cfg, precision=precision, mesh=mesh, shape=shape, registries=registries,
                             sequence_parallel=sequence_parallel, on_meta=on_meta, say=say)
    return prepare_frozen(model, precision=precision, mesh=mesh, shape=shape, registries=registries,
                          sequence_parallel=sequence_parallel, on_meta=on_meta)


def prepare_frozen(model: Any, *, precision: Any, mesh: Any, shape: Any, registries: Any,
                   sequence_parallel: bool, on_meta: bool = False) -> Any:
    """A model that only runs forward (a distillation teacher): no gradients, eval mode; on
    several processes parallelised on the mesh with parameters freed after every forward."""
    from automodel_cli.components.distributed.parallelize import parallelize_model

    model.requires_grad_(False)
    _install_experts(model, registries, "auto", precision)
    if not on_meta:
        model.to(precision.device)
    model.eval()
    if mesh is not None:
        model = parallelize_model(model, mesh, plan_registry=registries.parallel_plans, tp=shape.tp,
                                  sequence_parallel=sequence_parallel, mixed_precision=False)
        # No backward follows a forward: free every gathered parameter right after use (FSDP2
        # otherwise keeps the root's parameters gathered between forward and backward).
        if hasattr(model, "set_reshard_after_forward"):
            model.set_reshard_after_forward(True)
    return model
