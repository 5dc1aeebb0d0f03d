"""Generated-answer metrics: greedy decoding of prompts, scored against reference answers.

Teacher-forced validation (``evaluation.py``) asks whether the model *would* reproduce each
reference; this module lets it answer: the prompt of every sample (everything before its last
trained span) is decoded greedily with ``model.generate``, and the text up to the first EOS is
compared with the reference (that span), both stripped of surrounding white space:

- ``exact_match``: the answer equals the reference;
- ``contains``: the reference occurs in the answer (a model that keeps talking after the
  right answer still scores).

Prompts of different lengths are batched with LEFT padding, so every row's last prompt token sits
at the same position and generation continues all rows together; the attention mask hides the
padding (transformers derives the position ids from it), so a batched answer equals the answer
generated for the prompt alone.

Used by ``automodel evaluate`` and by validation during training (``train.eval_generate``). On
several processes every rank generates the same batch: the sharded forwards are collective, so
the ranks run the same number of decoding steps (``synced``: no rank stops before all have).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

IGNORE_INDEX = -100
#: The metric a validation result has when answers were generated.
GENERATED = "eval_generate_exact_match"


@dataclass(frozen=True)
class AnswerSample:
    """A prompt (token ids, BOS and chat template included) and the answer it should get."""

    prompt_ids: list[int]
    reference: str


@dataclass
class GenerationResult:
    """Per-sample answers and the metrics over them."""

    references: list[str]
    answers: list[str]
    prompts: list[str] = field(default_factory=list)

    @property
    def exact_match(self) -> float:
        return sum(a == r for a, r in zip(self.answers, self.references)) / max(1, len(self.answers))

    @property
    def contains(self) -> float:
        return sum(r in a for a, r in zip(self.answers, self.references)) / max(1, len(self.answers))

    def metrics(self, prefix: str = "eval_generate_") -> dict[str, float]:
        return {f"{prefix}exact_match": self.exact_match, f"{prefix}contains": self.contains,
                f"{prefix}samples": len(self.answers)}

    def examples(self, count: int) -> list[dict[str, str]]:
        """The first ``count`` samples: prompt, reference and the generated answer."""
        return [{"prompt": p, "reference": r, "answer": a}
                for p, r, a in zip(self.prompts, self.references, self.answers)][:count]


def normalise_answer(text: str) -> str:
    """How answers and references are compared: surrounding white space removed."""
    return text.strip()


def last_trained_span(labels: Sequence[int]) -> tuple[int, int] | None:
    """(start, end) of the last run of trained (not ``IGNORE_INDEX``) labels, or None."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    if end == 0:
        return None
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start, end


def answer_samples(samples: Iterable[dict[str, Any]], tokenizer: Any) -> list[AnswerSample]:
    """Prompts and references from tokenised SFT samples (``input_ids``, unshifted ``labels``):
    the prompt is every token before the last trained span (a chat's last assistant turn, a
    prompt/completion row's completion), the reference that span as text. Samples without a
    prompt are left out."""
    out = []
    for sample in samples:
        span = last_trained_span(sample["labels"])
        if span is None or span[0] == 0:
            continue
        start, end = span
        reference = tokenizer.decode(list(sample["input_ids"][start:end]), skip_special_tokens=True)
        out.append(AnswerSample(list(sample["input_ids"][:start]), normalise_answer(reference)))
    return out


def stop_ids(tokenizer: Any, model: Any) -> list[int]:
    """Token ids that end an answer: the tokenizer's EOS and the model's generation config's
    (a chat model's end-of-turn token)."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return ids


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Any, Any]:
    """(input_ids, attention_mask) with every prompt right-aligned."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt):] = 1
    return ids, mask


def until_stop(tokens: Sequence[int], stops: Sequence[int]) -> list[int]:
    """``tokens`` up to (without) the first stop token."""
    out = []
    for token in tokens:
        if token in stops:
            break
        out.append(int(token))
    return out


def greedy_generate(model: Any, prompts: Sequence[Sequence[int]], *, pad_id: int, stops: Sequence[int],
                    max_new_tokens: int, device: Any, autocast: Callable[[], Any] = nullcontext,
                    synced: bool = False) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (one batch, left-padded), each cut at its first stop
    token. ``synced``: on several processes, keep decoding until every rank has finished (the
    sharded forwards are collective)."""
    import torch
    from transformers import GenerationConfig

    ids, mask = left_pad(prompts, pad_id)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                              pad_token_id=pad_id, eos_token_id=list(stops) or None)
    with torch.no_grad(), autocast():
        output = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                                synced_gpus=synced)
    return [until_stop(row.tolist(), stops) for row in output[:, ids.size(1):].cpu()]


def generate_answers(model: Any, tokenizer: Any, samples: Sequence[AnswerSample], *, batch_size: int,
                     max_new_tokens: int, device: Any, autocast: Callable[[], Any] = nullcontext,
                     synced: bool = False) -> GenerationResult:
    """Generate an answer for every sample, ``batch_size`` prompts at a time (in order), and
    return them with their references. The model is put in eval mode for it and back after."""
    text = getattr(tokenizer, "tokenizer", tokenizer)
    pad_id = text.pad_token_id if text.pad_token_id is not None else text.eos_token_id
    stops = stop_ids(text, model)
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for begin in range(0, len(samples), batch_size):
            chunk = samples[begin:begin + batch_size]
            generated = greedy_generate(model, [s.prompt_ids for s in chunk], pad_id=pad_id, stops=stops,
                                        max_new_tokens=max_new_tokens, device=device, autocast=autocast,
                                        synced=synced)
            answers += [normalise_answer(text.decode(tokens, skip_special_tokens=True)) for tokens in generated]
    finally:
        if was_training:
            model.train()
    prompts = [text.decode(s.prompt_ids, skip_special_tokens=True) for s in samples]
    return GenerationResult([s.reference for s in samples], answers, prompts)


def format_generation(metrics: dict[str, Any], prefix: str = "eval_generate_") -> str:
    """One line: generated exact match and contains."""
    return (f"generated exact match {metrics[f'{prefix}exact_match']:.1%}, contains "
            f"{metrics[f'{prefix}contains']:.1%} ({metrics[f'{prefix}samples']} samples)")
