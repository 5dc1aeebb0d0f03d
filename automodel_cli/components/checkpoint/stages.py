"""Checkpoints of a model split into pipeline stages: each rank holds one stage's parameters.

Why a process-wide setting and not an argument: whether this process's model is one pipeline
stage is a fact of the process, like its process group, and it changes what every checkpoint
function must do (save, check, load, describe). The run sets it once (``set_part``) after the
model is split; without it every function behaves as for a whole model.

A stage's tensors keep the whole model's names, so DCP writes every stage's tensors into one
checkpoint, and a run with another number of stages (or none) reads the ones it holds:

* checks accept tensors of the checkpoint that another stage of this run holds;
* a tied LM head held by another stage than its embedding is saved by both stages; a run whose
  head copy finds no tensor of its own name in the checkpoint (saved without pipelining, where
  the tied weight is stored once) reads the embedding's, for the weight and its optimizer state;
* ``meta.json`` lists every stage's parameters and tied names (gathered to rank 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class PipelinePart:
    """This process holds one pipeline stage's part of the model: ``group`` is the pipeline's
    process group, ``tied`` maps a kept tied name to the name the weight has where it is stored
    once (``lm_head.weight`` -> ``model.embed_tokens.weight``)."""

    group: Any
    tied: dict[str, str] = field(default_factory=dict)

    def everyone(self, value: Any) -> list[Any]:
        """``value`` of every rank of the pipeline (collective over ``group``)."""
        from automodel_cli.components.checkpoint.collective import gather

        return gather(value, self.group)


_PART: PipelinePart | None = None


def set_part(part: PipelinePart | None) -> None:
    """Declare this process's model a pipeline stage's part (None: a whole model)."""
    global _PART
    _PART = part


def part() -> PipelinePart | None:
    return _PART


def other_stages(names: set[str]) -> set[str]:
    """Names the other stages of this pipeline hold (empty for a whole model). Collective."""
    if _PART is None:
        return set()
    return set().union(*map(set, _PART.everyone(sorted(names)))) - names


def all_tied() -> dict[str, str]:
    """Every stage's tied names (empty for a whole model). Collective."""
    if _PART is None:
        return {}
    return {alias: first for mapping in _PART.everyone(_PART.tied) for alias, first in mapping.items()}


def stored_names(keys: list[str], stored: set[str]) -> dict[str, str]:
    """key -> the checkpoint key to read it from: a tied head's copy missing from the checkpoint
    reads the embedding's tensor (keys may be optimizer keys: ``state.NAME.exp_avg``)."""
    if _PART is None or not _PART.tied:
        return {}
    renamed = {}
    for key in keys:
        if key in stored:
            continue
        for alias, first in _PART.tied.items():
            split = _split(key, alias)
            if split is not None and split[0] + first + split[1] in stored:
                renamed[key] = split[0] + first + split[1]
    return renamed


def _split(key: str, name: str) -> tuple[str, str] | None:
    """(prefix, rest) of a model or optimizer key about parameter ``name`` (``NAME``,
    ``state.NAME.exp_avg``, ``param_groups.NAME.lr``), or None when it is about another one."""
    for prefix in ("", "state.", "param_groups."):
        rest = key[len(prefix + name):]
        if key.startswith(prefix + name) and rest[:1] in ("", "."):
            return prefix, rest
    return None


def tied_copies(stored: set[str], tied: dict[str, str]) -> set[str]:
    """Keys of ``stored`` that belong to the second name of a tied weight (``tied``: alias ->
    name), saved by a pipeline stage that held that copy: a whole model reads the weight and
    its optimizer state under the first name."""
    return {key for key in stored for alias in tied if _split(key, alias) is not None}
