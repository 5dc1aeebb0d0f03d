"""Task heads on a decoder backbone: which transformers auto class builds a config's model.

A causal LM's config declares ``...ForCausalLM`` in ``architectures``; the same backbone with a
sequence-classification head (``AutoModelForSequenceClassification``: Llama, Qwen2, Mistral,
Gemma, ... each have one) declares ``...ForSequenceClassification``. The auto class is read from
that declaration by Hugging Face's naming convention (the class name's task suffix), never from a
table of architectures, so every architecture with such a head is covered. A recipe that trains a
head turns a causal LM's config into the head's with ``head_config_overrides``, given to
``TrainingRun.load_model``: they are applied on top of ``model.config`` wherever the run builds
the model (the sharded build, the whole-model path, a random base), and the trained model's
config, written into ``final/``, carries them. They are derived from the data on every start,
so the run's config.yaml stays what the user asked for (a resume compares it).
"""

from __future__ import annotations

from typing import Any

from automodel_cli.errors import UserError

#: Class-name suffix -> the transformers auto class that builds such models.
TASK_SUFFIXES = {"ForSequenceClassification": "AutoModelForSequenceClassification"}


def _field(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def declared_head(config: Any) -> Any | None:
    """The auto class of the task head ``config`` declares (its ``architectures``), or None for
    a config that declares none of ``TASK_SUFFIXES`` (a causal LM, a vision-language model)."""
    import transformers

    for name in _field(config, "architectures") or []:
        for suffix, auto in TASK_SUFFIXES.items():
            if str(name).endswith(suffix):
                return getattr(transformers, auto)
    return None


def declares_sequence_classifier(config: Any) -> bool:
    """Whether ``config`` (a config object or dict) is a sequence-classification model's."""
    from transformers import AutoModelForSequenceClassification

    return declared_head(config) is AutoModelForSequenceClassification


def is_sequence_classifier(model: Any) -> bool:
    """Whether ``model`` (possibly wrapped) is a sequence-classification model."""
    return declares_sequence_classifier(getattr(model, "config", None) or {})


def sequence_classification_class(config: Any, model_path: str) -> str:
    """The name of the ``...ForSequenceClassification`` class of ``config``'s architecture; a
    ``UserError`` when transformers has none for it."""
    from transformers import AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification._model_mapping[type(config)].__name__
    except (KeyError, ValueError, ImportError):
        raise UserError(
            f"The {config.model_type} architecture of `{model_path}` has no sequence-classification head in "
            f"transformers (AutoModelForSequenceClassification does not know it).",
            "Choose a model whose architecture has one (Llama, Qwen2/3, Mistral, Gemma, Phi-3, ...).",
        ) from None


def head_config_overrides(config: Any, model_path: str, *, labels: list[str], pad_token_id: int,
                          problem_type: str | None) -> dict[str, Any]:
    """``model.config`` values that make ``config`` (a causal LM's) a sequence classifier with
    ``labels`` (ids are their positions; one label: a scalar score, e.g. a reward) that pools the
    last token that is not ``pad_token_id``."""
    return {
        "architectures": [sequence_classification_class(config, model_path)],
        "num_labels": len(labels),
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
        "pad_token_id": int(pad_token_id),
        "problem_type": problem_type,
    }


def new_head_keys(model: Any, expected: list[str], available: set[str]) -> set[str]:
    """Checkpoint keys of a declared task head that the checkpoint lacks (a causal LM's
    checkpoint has no ``score``): parameters outside the backbone (``base_model_prefix``), to be
    initialised at random. Empty for a model without a declared head, so a causal LM whose
    checkpoint lacks weights is still refused as before."""
    if declared_head(getattr(model, "config", None) or {}) is None:
        return set()
    prefix = getattr(model, "base_model_prefix", "") or ""
    return {key for key in expected
            if key not in available and not (prefix and key.startswith(prefix + "."))}


class ModelSection:
    """A ``model`` config section whose ``config`` overrides have ``extra`` applied on top (every
    other key reads through): what ``load_config`` and the model builders read."""

    def __init__(self, section: Any, extra: dict[str, Any]):
        self._section, self._extra = section, extra

    def __getattr__(self, name: str) -> Any:
        if name == "config":
            own = self._section.config
            return {**(own.to_dict() if hasattr(own, "to_dict") else dict(own)), **self._extra}
        return getattr(self._section, name)
