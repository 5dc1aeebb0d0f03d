"""The reference model of preference training: where ``log π_ref`` comes from.

- ``copy``: a frozen model loaded and sharded like the policy (``training/teacher.py``'s
  ``FrozenTeacher``: the policy's TP plan, then FSDP2 resharding after every forward; no
  optimizer, never saved): the policy's own starting weights (``model.path``), or
  ``dpo.reference_path``;
- ``adapter``: with LoRA/DoRA and no ``dpo.reference_path``, the policy with its adapter
  disabled (peft's ``disable_adapter()``) *is* the base model: no second copy in memory;
- ``none``: reference-free losses (simpo, orpo) load nothing.

With ``dpo.precompute_reference=true`` the reference's log-probabilities of every pair are
computed once before training (``precompute``) and stored with the pairs, and the reference
model is freed before the first step.
"""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace
from typing import Any

from automodel_cli.components.models.model_files import Role

REFERENCE = Role(name="reference model", path_key="dpo.reference_path", tokenizer_key="dpo.reference_path",
                 trust_note=" (model.trust_remote_code applies to the policy and the reference)",
                 from_scratch_key=None)


def reference_kind(cfg: Any) -> str:
    """``none``, ``adapter`` or ``copy`` (module docstring)."""
    from automodel_cli.components.loss.preference import REFERENCE_FREE

    if cfg.dpo.loss in REFERENCE_FREE:
        return "none"
    if cfg.peft.method != "none" and not cfg.dpo.reference_path:
        return "adapter"
    return "copy"


def reference_model_config(cfg: Any) -> Any:
    """``dpo.reference_path`` as a ``model`` section, checked now (errors name that key), or
    None when the reference is the policy's own ``model.*``."""
    from automodel_cli.components.models.loading import check_model_source

    if not cfg.dpo.reference_path:
        return None
    reference_cfg = SimpleNamespace(
        path=cfg.dpo.reference_path, revision=None, from_scratch=False, config={},
        trust_remote_code=cfg.model.trust_remote_code, attn_implementation=cfg.model.attn_implementation,
        tokenizer=None, chat_template=None, role=REFERENCE, meta_init=cfg.model.meta_init)
    check_model_source(reference_cfg, weights=True)
    return reference_cfg


def response_logps(model: Any, inputs: dict[str, Any], labels: Any, sequence_index: Any, sequences: int,
                   autocast: Any = nullcontext) -> tuple[Any, Any]:
    """Per-sequence sums of the response tokens' log-probabilities under ``model`` and their
    counts (``preference.sequence_logps``), with the LM head applied to the scored positions only
    when it can be (``head.scored_rows``; prompts and padding cost no vocabulary projection), else
    from the full logits. Inputs, labels and ``sequence_index`` on the model's device."""
    from automodel_cli.components.loss.head import scored_rows
    from automodel_cli.components.loss.preference import sequence_logps, sum_by_sequence, token_logps

    values = scored_rows(model, inputs, labels, lambda hidden, targets, project: token_logps(project(hidden), targets),
                         autocast)
    if values is None:
        with autocast():
            logits = model(**inputs, use_cache=False).logits
        return sequence_logps(logits, labels, sequence_index, sequences)
    targets = labels[:, 1:].reshape(-1)
    owners = sequence_index[:, 1:].reshape(-1)[(targets != -100).nonzero().squeeze(1)]
    return sum_by_sequence(values, owners.to(values.device), sequences)


class Reference:
    """The reference model's log-probabilities, without gradients (module docstring)."""

    def __init__(self, run: Any, policy: Any, reference_cfg: Any):
        self.kind = reference_kind(run.cfg)
        self.policy = policy
        self.frozen: Any = None
        if self.kind == "copy":
            from automodel_cli.training.teacher import FrozenTeacher

            self.frozen = FrozenTeacher(reference_cfg or run.cfg.model, run, dtype=run.precision.param_dtype)
        self.source = run.cfg.dpo.reference_path or run.cfg.model.path

    def logps(self, inputs: dict[str, Any], labels: Any, sequence_index: Any, sequences: int,
              autocast: Any = nullcontext) -> Any:
        """The reference's per-sequence response log-probabilities (``response_logps``), without
        gradients."""
        import torch

        model = self.policy if self.kind == "adapter" else self.frozen.model
        with torch.no_grad(), (self.policy.disable_adapter() if self.kind == "adapter" else nullcontext()):
            return response_logps(model, inputs, labels, sequence_index, sequences, autocast)[0]

    def free(self) -> None:
        """Drop the frozen copy (after precomputing): its memory goes back before training."""
        import gc

        self.frozen = None
        gc.collect()

    def describe(self) -> str:
        if self.kind == "adapter":
            return "the base model: the policy with its adapter disabled (no second copy)"
        if self.frozen is None:
            return f"{self.source} (log-probabilities precomputed, the model freed)"
        return f"{self.source}, a frozen copy ({self.frozen.describe()})"
