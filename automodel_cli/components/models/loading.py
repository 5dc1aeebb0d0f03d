"""Load a causal LM and its tokenizer from a hub id or a local directory.

Everything goes through the real ``from_pretrained`` / ``from_config`` paths of transformers, so
any ``AutoModelForCausalLM`` architecture works. Failures users can fix (a missing directory, no
network, a directory without weights) become ``UserError`` with the fix in the message.
``trust_remote_code`` is passed through only when the user sets it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from automodel_cli.errors import UserError

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
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


def resolve_model_source(path: str | None) -> str:
    if not path:
        raise UserError(
            "No model given.",
            "Pass a preset as TARGET (`automodel list models`) or set model.path=HUB_ID_OR_DIR.",
        )
    expanded = os.path.expanduser(path)
    if is_config_file(path):  # a bare config.json: an architecture to train from scratch
        return os.path.abspath(expanded)
    if looks_like_local_path(path) and not os.path.isdir(expanded):
        raise UserError(
            f"Model directory `{path}` does not exist (model.path).",
            "Check the path, or pass a Hugging Face hub id such as meta-llama/Llama-3.2-1B.",
        )
    return os.path.abspath(expanded) if os.path.isdir(expanded) else path


def is_config_file(path: str | None) -> bool:
    """``model.path`` names a config.json file rather than a model directory or hub id."""
    return bool(path) and path.endswith(".json") and os.path.isfile(os.path.expanduser(path))


def _hub_error(path: str, what: str, exc: Exception) -> UserError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(
        f"Could not load the {what} `{path}` ({first_line}).",
        "If it is a hub id, check the spelling and that this machine can reach the Hugging Face "
        "hub (and HF_TOKEN for gated models); without network, download it elsewhere "
        f"(`hf download {path} --local-dir DIR`) and pass model.path=DIR.",
    )


def load_config(model_cfg: Any) -> Any:
    """The HF config with ``model.config`` overrides applied."""
    from transformers import AutoConfig

    from automodel_cli.assets import bundled_config

    source = resolve_model_source(model_cfg.path)
    if model_cfg.from_scratch and not model_cfg.revision:
        # Only the architecture is needed: a bundled copy of a preset's hub config avoids the
        # network (automodel_cli/assets/configs).
        source = str(bundled_config(model_cfg.path) or source)
    try:
        config = AutoConfig.from_pretrained(
            source, trust_remote_code=model_cfg.trust_remote_code, revision=model_cfg.revision
        )
    except (OSError, ValueError) as exc:
        raise _hub_error(model_cfg.path, "model config", exc) from None
    overrides = model_cfg.config.to_dict() if hasattr(model_cfg.config, "to_dict") else dict(model_cfg.config)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise UserError(
                f"`model.config.{key}` is not a field of the {config.model_type} config.",
                "See the model's config.json for valid names.",
            )
        setattr(config, key, value)
    return config


def has_weights(directory: str) -> bool:
    return any(next(Path(directory).glob(pattern), None) for pattern in WEIGHT_PATTERNS)


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
    import torch
    from transformers import AutoModelForCausalLM

    config = load_config(model_cfg)
    kwargs: dict[str, Any] = {"trust_remote_code": model_cfg.trust_remote_code}
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    source = resolve_model_source(model_cfg.path)
    if model_cfg.from_scratch:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
        return model
    if is_config_file(source) or os.path.isdir(source) and not has_weights(source):
        raise UserError(
            f"`{model_cfg.path}` has a model config but no weights (*.safetensors or *.bin).",
            "Point model.path at a directory written by save_pretrained, or set "
            "model.from_scratch=true to train from a random initialisation.",
        )
    try:
        return AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=dtype, revision=model_cfg.revision, **kwargs
        )
    except (OSError, ValueError) as exc:
        raise _hub_error(model_cfg.path, "model", exc) from None


def load_tokenizer(model_cfg: Any) -> Any:
    """The tokenizer, with a pad token (EOS when the tokenizer has none)."""
    from transformers import AutoTokenizer

    path = model_cfg.tokenizer or model_cfg.path
    if is_config_file(path):
        raise UserError(
            f"`{path}` is a model config file, which holds no tokenizer.",
            "Set model.tokenizer to a tokenizer directory or hub id (for example the directory "
            "of a model with the same vocabulary).",
        )
    source = resolve_model_source(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=model_cfg.trust_remote_code, revision=model_cfg.revision
        )
    except (OSError, ValueError) as exc:
        raise _hub_error(path, "tokenizer", exc) from None
    if model_cfg.chat_template:
        tokenizer.chat_template = model_cfg.chat_template
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
