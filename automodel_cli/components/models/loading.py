"""Load a causal LM (or a vision-language model) and its tokenizer from a hub id or a local directory.

Everything goes through the real ``from_pretrained`` / ``from_config`` paths of transformers, so
any ``AutoModelForCausalLM`` architecture works, and any ``AutoModelForImageTextToText`` one: the
auto class is chosen from the config (``vlm.auto_class``) before anything loads. Failures users can fix (a missing directory, a
directory that is not a model, truncated or unsafe weight files, custom code not trusted, no
network) become ``UserError`` with the fix in the message, found by cheap checks before anything
loads where possible (``model_files``, ``hub``). ``trust_remote_code`` is passed through only
when the user sets it; pickled weights are only ever read with ``weights_only=True``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from automodel_cli.components.models.hub import hub_access
from automodel_cli.components.models.model_files import (
    MODEL,
    Role,
    check_model_dir,
    check_remote_code,
    read_config_json,
    remote_code_error,
    role_of,
)
from automodel_cli.errors import UserError

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def looks_like_local_path(path: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else is meant as a local path."""
    return (
        os.path.isabs(path)
        or path.startswith((".", "~"))
        or path.count("/") > 1
        or os.sep != "/" and os.sep in path
        or os.path.exists(path)
    )


def resolve_model_source(path: str | None, role: Role = MODEL, *, key: str | None = None) -> str:
    """``path`` as ``from_pretrained`` should get it: an absolute local path, or a hub id. A
    path that looks local but is not a directory (or a config.json file) is a ``UserError``
    naming ``key`` (default: the role's path key)."""
    key = key or role.path_key
    if not path:
        raise UserError(
            f"No {role.name} given ({key}).",
            "Pass a preset as TARGET (`automodel list models`) or set model.path=HUB_ID_OR_DIR."
            if role == MODEL else f"Set {key} to a Hugging Face hub id or a local model directory.",
        )
    expanded = os.path.expanduser(path)
    if is_config_file(path):  # a bare config.json: an architecture to train from scratch
        return os.path.abspath(expanded)
    title = role.title if key == role.path_key else "Tokenizer"
    if looks_like_local_path(path) and os.path.isfile(expanded):
        raise UserError(
            f"{title} `{path}` ({key}) is a file; it must be a directory written by save_pretrained.",
            f"Point {key} at the directory that holds this file (a run's model is RUN_DIR/final), "
            f"or at a Hugging Face hub id.",
        )
    if looks_like_local_path(path) and not os.path.isdir(expanded):
        raise UserError(
            f"{title} directory `{path}` does not exist ({key}).",
            "Check the path (a run's model is RUN_DIR/final), or pass a Hugging Face hub id such as "
            "meta-llama/Llama-3.2-1B.",
        )
    return os.path.abspath(expanded) if os.path.isdir(expanded) else path


def is_config_file(path: str | None) -> bool:
    """``model.path`` names a config.json file rather than a model directory or hub id."""
    return bool(path) and path.endswith(".json") and os.path.isfile(os.path.expanduser(path))


def source_access(source: str, revision: str | None, key: str) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments for ``source`` (named by config key ``key``): none for
    a local path; for a hub id see ``hub.hub_access`` (cache only, or a ``UserError`` at once,
    when the hub cannot be reached)."""
    return {} if os.path.exists(source) else hub_access(source, revision=revision, key=key)


def _load_error(path: str, source: str, what: str, role: Role, exc: Exception, key: str | None = None) -> UserError:
    """A loader's failure as a ``UserError``: custom code to trust, a local directory that does
    not load (what it says), or a hub id that could not be fetched (how to get it)."""
    key = key or role.path_key
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "trust_remote_code" in str(exc):
        return remote_code_error(path, role, "transformers reports custom code in it")
    if os.path.exists(source):
        return UserError(
            f"Could not load the {what} from `{path}` ({key}): {first_line.rstrip('.')}.",
            "Check that the directory was written by save_pretrained and copied completely, with a "
            "transformers version that knows its architecture.",
        )
    return UserError(
        f"Could not load the {what} `{path}` ({key}): {first_line.rstrip('.')}.",
        "Check the spelling of the hub id (and HF_TOKEN for gated models); without network, download it "
        f"elsewhere (`hf download {path} --local-dir DIR`) and set {key}=DIR.",
    )


def check_model_source(model_cfg: Any, *, weights: bool | None = None) -> None:
    """Everything about ``model_cfg.path`` that can be checked before anything loads: a local
    directory's config.json, custom code and (``weights``, default: unless from_scratch) weight
    files; for a hub id whose weights will be downloaded, that the hub or the cache has it."""
    role = role_of(model_cfg)
    source = resolve_model_source(model_cfg.path, role)
    if weights is None:
        weights = not getattr(model_cfg, "from_scratch", False)
    if is_config_file(source):
        if weights:
            scratch = f"set {role.from_scratch_key}=true to train from a random initialisation, or " \
                if role.from_scratch_key else ""
            raise UserError(f"`{model_cfg.path}` ({role.path_key}) is a config.json file, which holds no weights.",
                            f"To start from weights, {scratch}point {role.path_key} at a model directory.")
        return
    if os.path.isdir(source):
        check_model_dir(Path(source), model_cfg.path, role, trust_remote_code=model_cfg.trust_remote_code,
                        weights=weights)
    elif weights:
        hub_access(source, revision=model_cfg.revision, key=role.path_key)


def load_config(model_cfg: Any) -> Any:
    """The HF config with ``model.config`` overrides applied."""
    from transformers import AutoConfig

    from automodel_cli.assets import bundled_config

    role = role_of(model_cfg)
    source = resolve_model_source(model_cfg.path, role)
    if model_cfg.from_scratch and not model_cfg.revision:
        # Only the architecture is needed: a bundled copy of a preset's hub config avoids the
        # network (automodel_cli/assets/configs).
        source = str(bundled_config(model_cfg.path) or source)
    if os.path.isdir(source):
        config_json = read_config_json(Path(source), model_cfg.path, role)
        check_remote_code(config_json, model_cfg.path, role, trusted=model_cfg.trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(
            source, trust_remote_code=model_cfg.trust_remote_code, revision=model_cfg.revision,
            **source_access(source, model_cfg.revision, role.path_key),
        )
    except (OSError, ValueError) as exc:
        raise _load_error(model_cfg.path, source, "model config", role, exc) from None
    overrides = model_cfg.config.to_dict() if hasattr(model_cfg.config, "to_dict") else dict(model_cfg.config)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise UserError(
                f"`model.config.{key}` is not a field of the {config.model_type} config.",
                "See the model's config.json for valid names.",
            )
        setattr(config, key, value)
    return config


def torch_dtype(name: str, device_type: str) -> Any:
    """``auto`` means bf16 on GPUs that support it and fp32 elsewhere."""
    import torch

    if name == "auto":
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, DTYPES[name])


def load_model(model_cfg: Any, *, seed: int, dtype: Any) -> Any:
    """Instantiate the model: from weights, or randomly from its config when from_scratch."""
    import pickle

    import torch
    from safetensors import SafetensorError

    from automodel_cli.components.models.vlm import auto_class

    config = load_config(model_cfg)
    model_class = auto_class(config)
    kwargs: dict[str, Any] = {"trust_remote_code": model_cfg.trust_remote_code}
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    role = role_of(model_cfg)
    source = resolve_model_source(model_cfg.path, role)
    if model_cfg.from_scratch:
        torch.manual_seed(seed)
        model = model_class.from_config(config, dtype=dtype, **kwargs)
        return model
    check_model_source(model_cfg, weights=True)
    access = source_access(source, model_cfg.revision, role.path_key)
    if access.get("local_files_only"):  # the adapter-config lookup has its own hub arguments
        kwargs["adapter_kwargs"] = {"local_files_only": True}
    try:
        return model_class.from_pretrained(
            source, config=config, dtype=dtype, revision=model_cfg.revision, **access, **kwargs,
        )
    except (OSError, ValueError, SafetensorError, pickle.UnpicklingError) as exc:
        raise _load_error(model_cfg.path, source, role.name, role, exc) from None


def needs_torchvision(exc: BaseException) -> bool:
    """Whether a processor failed to load because torchvision is missing (Qwen2-VL and others
    build a video processor, which transformers only offers with torchvision)."""
    import importlib.util

    text = str(exc).lower()
    return importlib.util.find_spec("torchvision") is None and ("video processor" in text or "torchvision" in text)


def load_tokenizer(model_cfg: Any, *, processor: bool = False, eos_as_pad: bool = True) -> Any:
    """The tokenizer, with a pad token (EOS when the tokenizer has none, unless ``eos_as_pad`` is
    false: a recipe for which padding means something decides itself); with ``processor``, the
    model's ``AutoProcessor`` (tokenizer, image processor, chat template) for a vision-language
    model, its tokenizer given the same pad token.

    For a model section (one with ``from_scratch``) the model source is checked first
    (``check_model_source``), so a directory that is not a model is reported as such rather
    than as a missing tokenizer, before any data is read."""
    from transformers import AutoProcessor, AutoTokenizer

    from automodel_cli.components.checkpoint.consolidate import TOKENIZER_FILES

    role = role_of(model_cfg)
    if getattr(model_cfg, "from_scratch", None) is not None:
        check_model_source(model_cfg)
    path = model_cfg.tokenizer or model_cfg.path
    key = role.tokenizer_key if model_cfg.tokenizer else role.path_key
    if is_config_file(path):
        raise UserError(
            f"`{path}` is a model config file, which holds no tokenizer.",
            "Set model.tokenizer to a tokenizer directory or hub id (for example the directory "
            "of a model with the same vocabulary).",
        )
    source = resolve_model_source(path, role, key=key)
    try:
        tokenizer = (AutoProcessor if processor else AutoTokenizer).from_pretrained(
            source, trust_remote_code=model_cfg.trust_remote_code, revision=model_cfg.revision,
            **source_access(source, model_cfg.revision, key),
        )
    except (OSError, ValueError) as exc:
        if os.path.isdir(source) and not any(os.path.exists(os.path.join(source, n)) for n in TOKENIZER_FILES):
            raise UserError(
                f"`{path}` ({key}) holds no tokenizer (none of {', '.join(TOKENIZER_FILES[:4])}, ...).",
                f"Set {role.tokenizer_key} to the directory or hub id of the tokenizer the model was trained with.",
            ) from None
        if processor and needs_torchvision(exc):
            raise UserError(
                f"The processor of `{path}` ({key}) needs torchvision, which is not installed: transformers "
                f"builds this model's video processor with it.",
                "Install torchvision built for your torch (`pip install 'automodel-cli[vlm]'`, or the "
                "torchvision wheel matching your torch and CUDA).",
            ) from None
        raise _load_error(path, source, "processor" if processor else "tokenizer", role, exc, key=key) from None
    text = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's text half
    if model_cfg.chat_template:
        tokenizer.chat_template = model_cfg.chat_template
    if text.pad_token_id is None and eos_as_pad:
        text.pad_token = text.eos_token
    return tokenizer
