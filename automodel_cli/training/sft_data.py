"""From config to ready-to-collate SFT samples: load, split, tokenise, mask, pack."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from automodel_cli.errors import UserError


@dataclass
class SFTData:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    eval_collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    #: Tokens per training sample (no padding): for length grouping and tokens/s.
    train_lengths: list[int] = field(default_factory=list)
    #: Trained (label) tokens per training sample, so every rank knows a step's total.
    train_label_tokens: list[int] = field(default_factory=list)

    @staticmethod
    def sample_length(sample: dict[str, Any]) -> int:
        return len(sample["input_ids"])

    def eval_batches(self, batch_size: int, max_batches: int | None) -> Iterator[dict[str, Any]]:
        """Validation batches of similar-length samples, in a fixed order."""
        order = sorted(range(len(self.eval)), key=lambda i: (self.sample_length(self.eval[i]), i))
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for chunk in chunks[:max_batches] if max_batches else chunks:
            yield self.eval_collate([self.eval[i] for i in chunk])


def dataset_options(cfg: Any, registries: Any, name: str) -> dict[str, Any]:
    """What a dataset factory gets as ``options``: ``data.options`` (keyword arguments for
    ``datasets.load_dataset``) and the dataset's own declared options (``data.NAME``)."""
    from automodel_cli.config.compose import entry_options

    return {**cfg.data.options.to_dict(), **entry_options(cfg, registries.datasets, name)}


def _dataset_name(cfg: Any, auto: str = "instruction") -> str:
    name = cfg.data.name
    if name == "auto":
        if not cfg.data.path:
            raise UserError(
                "No training data given.",
                "Set data.path to a jsonl/json/parquet/csv file or a hub dataset id, or "
                "data.name to a registered dataset (`automodel list datasets`).",
            )
        name = auto
    return name


def load_tables(cfg: Any, registries: Any, auto: str = "instruction") -> tuple[Any, Any | None]:
    """Training and validation tables of ``data.*`` (path or registered name, eval path/split/size),
    shared by every recipe that reads rows: ``auto`` is the loader data.name=auto means."""
    name = _dataset_name(cfg, auto)
    factory = registries.datasets.get(name).load()
    options = dataset_options(cfg, registries, name)
    train = factory(cfg.data.path, cfg.data.split, options)
    evaluation = None
    if cfg.data.eval_path:
        evaluation = factory(cfg.data.eval_path, cfg.data.eval_split or "train", options)
    elif cfg.data.eval_split:
        evaluation = factory(cfg.data.path, cfg.data.eval_split, options)
    size = cfg.data.eval_size
    if size and evaluation is None:
        if isinstance(size, float) and not 0 < size < 1:
            raise UserError(f"data.eval_size={size} must be a fraction between 0 and 1 or a sample count.")
        split = train.train_test_split(test_size=size, seed=cfg.train.seed, shuffle=True)
        train, evaluation = split["train"], split["test"]
    return train, evaluation


def _tokenize(table: Any, tokenizer: Any, cfg: Any, say: Callable[[str], None], what: str,
              text_column: str | None = None) -> Any:
    from automodel_cli.components.data import tokenize_sft

    return _reporting(say, what, lambda: tokenize_sft(
        table, tokenizer,
        prompt_column=cfg.data.prompt_column, completion_column=cfg.data.completion_column,
        messages_column=cfg.data.messages_column, max_length=cfg.data.max_length,
        chat_template=cfg.model.chat_template, text_column=text_column,
    ))


def _reporting(say: Callable[[str], None], what: str, encode: Callable[[], tuple[Any, Any]]) -> Any:
    """Run ``encode() -> (samples, SFTStats)``, telling the user its warnings and counts."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoded, stats = encode()
    for warning in caught:
        say(f"warning ({what} data): {warning.message}")
    say(f"{what} data: {stats.n_samples} samples, {stats.n_tokens} tokens, "
        f"{stats.n_trainable_tokens} trained tokens, {stats.n_truncated} truncated"
        + (f", {stats.n_dropped} dropped" if stats.n_dropped else ""))
    return encoded


def _samples(tokenized: Any) -> list[dict[str, Any]]:
    return [{"input_ids": ids, "labels": labels}
            for ids, labels in zip(tokenized["input_ids"], tokenized["labels"])]


def prepare_sft_data(cfg: Any, tokenizer: Any, registries: Any, say: Callable[[str], None],
                     pad_to_multiple_of: int | None = None) -> SFTData:
    """``pad_to_multiple_of``: sequence parallelism splits the sequence over the tensor-parallel
    ranks, so batches are padded to a multiple of that degree."""
    if cfg.data.name == "vlm":  # image-text rows: only a vision-language model has inputs for the images
        raise UserError(
            f"data.name=vlm reads image-text data, but the model ({cfg.model.path}) is text-only: "
            "it has no vision tower or image processor.",
            "Fine-tune a vision-language model (one whose config has a vision_config, e.g. Qwen2-VL "
            "or Gemma 3), or use text data with data.name=auto.",
        )
    train_table, eval_table = load_tables(cfg, registries)
    train = _samples(_tokenize(train_table, tokenizer, cfg, say, "train"))
    evaluation = _samples(_tokenize(eval_table, tokenizer, cfg, say, "eval")) if eval_table is not None else []
    pad_id = tokenizer.pad_token_id
    if cfg.data.packing:
        train = _pack(train, cfg, say)
    return _sft_data(train, evaluation, cfg, pad_id, pad_to_multiple_of)


def prepare_eval_samples(cfg: Any, tokenizer: Any, registries: Any, say: Callable[[str], None],
                         limit: int | None = None, as_chat: bool = False) -> tuple[list[dict[str, Any]], str]:
    """The samples ``automodel evaluate`` scores and how they are read ("chat",
    "prompt/completion" or "text"): the validation data the config names (data.eval_path,
    data.eval_split, or the data.eval_size part of data.path held out with train.seed, as
    training held it out), else all of data.path; the first ``limit`` rows only when given.
    Plain text (``data.text_column``) counts every token. ``as_chat``: prompt/completion rows
    become a user turn and an assistant turn, rendered with the chat template."""
    table, _ = evaluation_table(cfg, registries, limit)
    columns = set(table.column_names)
    data = cfg.data
    mode = ("chat" if data.messages_column in columns else
            "prompt/completion" if {data.prompt_column, data.completion_column} <= columns else "text")
    if as_chat and mode == "prompt/completion":
        table, mode = _as_conversations(table, data.prompt_column, data.completion_column, data.messages_column), "chat"
    return _samples(_tokenize(table, tokenizer, cfg, say, "eval", text_column=data.text_column)), mode


def evaluation_table(cfg: Any, registries: Any, limit: int | None = None) -> tuple[Any, str]:
    """The table ``automodel evaluate`` scores and where it comes from: the validation data the
    config names (data.eval_path, data.eval_split, or the data.eval_size part of data.path held
    out with train.seed), else all of data.path; the first ``limit`` rows only when given."""
    train_table, eval_table = load_tables(cfg, registries)
    source = cfg.data.path or cfg.data.name
    table = train_table
    if eval_table is not None:
        table, source = eval_table, cfg.data.eval_path or source
    if limit is not None and limit < len(table):
        table = table.select(range(limit))
    return table, source


def _as_conversations(table: Any, prompt: str, completion: str, messages: str) -> Any:
    """Prompt/completion rows as one user turn and one assistant turn each."""
    return table.map(lambda row: {messages: [{"role": "user", "content": row[prompt]},
                                             {"role": "assistant", "content": row[completion]}]},
                     remove_columns=table.column_names, desc="Prompt/completion as chat")


def eval_only_data(samples: list[dict[str, Any]], cfg: Any, pad_id: int) -> SFTData:
    """``SFTData`` holding ``samples`` as its validation data (batched as finetune's validation)."""
    return _sft_data([], samples, cfg, pad_id, None)


def _pack(train: list[dict[str, Any]], cfg: Any, say: Callable[[str], None]) -> list[dict[str, Any]]:
    from automodel_cli.components.data import pack_sequences, padding_fraction

    packs = pack_sequences([s["input_ids"] for s in train], [s["labels"] for s in train], cfg.data.max_length)
    say(f"packing: {len(train)} samples into {len(packs)} sequences of up to "
        f"{cfg.data.max_length} tokens ({padding_fraction(packs, cfg.data.max_length):.1%} padding)")
    return packs


def _sft_data(train: list[dict[str, Any]], evaluation: list[dict[str, Any]], cfg: Any, pad_id: int,
              pad_to_multiple_of: int | None, collator: Any = None) -> SFTData:
    """``collator``: batches train and eval samples (default: ``SFTCollator``, packed as configured)."""
    from automodel_cli.components.data import IGNORE_INDEX, SFTCollator

    lengths = [len(s["input_ids"]) for s in train]
    return SFTData(
        train=train,
        eval=evaluation,
        # Flash attention finds document boundaries from position ids only in a batch of one
        # row, so packs are laid end to end there; sdpa/eager get a block-diagonal mask instead.
        collate=collator or SFTCollator(
            pad_id, packed=cfg.data.packing, pad_to_multiple_of=pad_to_multiple_of,
            flatten=cfg.data.packing and str(cfg.model.attn_implementation or "").startswith("flash")),
        eval_collate=collator or SFTCollator(pad_id, packed=False, pad_to_multiple_of=pad_to_multiple_of),
        train_lengths=lengths,
        train_label_tokens=[sum(label != IGNORE_INDEX for label in s["labels"][1:]) for s in train],
    )


def prepare_vlm_data(cfg: Any, processor: Any, registries: Any, say: Callable[[str], None],
                     pad_to_multiple_of: int | None = None) -> SFTData:
    """``prepare_sft_data`` for vision-language models, given the model's processor: data.name=auto
    means the ``vlm`` image-text loader, data.min_pixels/max_pixels set the processor's image
    resolution, samples carry their image tensors (components/data/multimodal.py) and batch with
    ``VLMCollator``. Packing is refused when the data has images (text-only data packs as usual)."""
    from automodel_cli.components.data import VLMCollator, refuse_packing
    from automodel_cli.components.data.multimodal import apply_resolution_limits, encode_multimodal

    apply_resolution_limits(processor, cfg.data.min_pixels, cfg.data.max_pixels)
    train_table, eval_table = load_tables(cfg, registries, auto="vlm")

    def encode(table: Any, what: str) -> list[dict[str, Any]]:
        return _reporting(say, what, lambda: encode_multimodal(
            table, processor, max_length=cfg.data.max_length, chat_template=cfg.model.chat_template))

    train = encode(train_table, "train")
    evaluation = encode(eval_table, "eval") if eval_table is not None else []
    pad_id = processor.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = processor.tokenizer.eos_token_id
    if cfg.data.packing:
        refuse_packing(train + evaluation)
        return _sft_data(_pack(train, cfg, say), evaluation, cfg, pad_id, pad_to_multiple_of)
    return _sft_data(train, evaluation, cfg, pad_id, pad_to_multiple_of,
                     collator=VLMCollator(pad_id, pad_to_multiple_of=pad_to_multiple_of))


# ---------------------------------------------------------------------- steps and validation
#: Batch keys that are not the model's inputs: the labels go to the loss, the count of trained
#: tokens to its normalisation.
NOT_MODEL_INPUTS = ("labels", "num_label_tokens")


def model_inputs(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """The model's inputs of a collated batch, on ``device``: token ids, attention mask or
    position ids, and for a vision-language model its image tensors and token types."""
    return {key: value.to(device) for key, value in batch.items() if key not in NOT_MODEL_INPUTS}


def sft_step(run: Any, model: Any, data: SFTData, plan: Any,
             extra_metrics: Callable[[int], dict[str, Any]] | None = None) -> Callable[[int], Any]:
    """The step function of supervised fine-tuning, for ``TrainingRun.train``: the step's samples
    (``plan``, a ``StepPlan``), cut into micro-batches of similar length; this rank takes its
    share, computes ``run.loss_spec`` on each (normalised by the step's trained tokens over all
    ranks; with context parallelism on this rank's part of each sequence) and backpropagates. ``extra_metrics(index)`` adds the recipe's own numbers to the
    step's metrics (called after the step's backward passes)."""
    import torch

    from automodel_cli.components.training import steps as step_math
    from automodel_cli.training.context_parallel import micro_batch_loss
    from automodel_cli.training.run import StepOutput

    micro_batch_size = run.cfg.train.micro_batch_size

    def step(index: int) -> StepOutput:
        samples = plan.samples(index)
        groups = step_math.micro_batches(samples, data.train_lengths, micro_batch_size)
        label_tokens = sum(data.train_label_tokens[i] for i in samples)
        loss_sum = torch.zeros((), device=run.precision.device)
        mine = groups[run.dp_index::run.dp_size]  # this rank's share of the step
        if run.pipeline is not None:  # every stage's rank reads the same micro-batches
            loss_sum = run.pipeline.step([data.collate([data.train[i] for i in group]) for group in mine], label_tokens,
                                         micro_batch_size, max(data.train_lengths[i] for i in samples))
            mine = []
        for group in mine:
            batch = data.collate([data.train[i] for i in group])
            loss = micro_batch_loss(run, model, model_inputs(batch, run.precision.device), batch["labels"],
                                    label_tokens)
            loss.backward()
            loss_sum += loss.detach()
        metrics = {"label_tokens": label_tokens, **(extra_metrics(index) if extra_metrics else {}),
                   "epoch": plan.epoch_of(index)}
        return StepOutput({"loss": loss_sum}, tokens=sum(data.train_lengths[i] for i in samples), metrics=metrics)

    return step


def sft_validation(run: Any, model: Any, data: SFTData, tokenizer: Any = None) -> Callable[[], dict[str, float] | None]:
    """Validation for ``TrainingRun.train``: loss, exact match and token accuracy on the held-out
    samples (``train.eval_batches`` batches of 4 micro-batches' size at most); None without
    validation data. Every rank evaluates the same batches (sharded forwards are collective),
    whole: with context parallelism too (``whole_sequences``). With ``train.eval_generate``
    (``tokenizer`` given) also the generated answers' metrics (``generation_validation``)."""
    from automodel_cli.components.training.evaluation import evaluate
    from automodel_cli.training.context_parallel import whole_sequences

    generate = generation_validation(run, model, data, tokenizer) if run.cfg.train.eval_generate else None

    def forward(model_: Any, batch: dict[str, Any]) -> Any:
        with run.precision.autocast():
            return model_(**model_inputs(batch, run.precision.device), use_cache=False).logits

    def validate() -> dict[str, float] | None:
        if not data.eval:
            return None
        cfg = run.cfg
        with whole_sequences(model, run.cp_size):
            result = evaluate(run.evaluation_model(model),
                              data.eval_batches(cfg.train.micro_batch_size * 4, cfg.train.eval_batches), forward)
        return {**result, **generate()} if generate is not None else result

    return validate


def check_eval_generate(cfg: Any, shape: Any, vision: bool) -> None:
    """``train.eval_generate`` decodes with the whole model on every rank: refused (before the
    model loads) where that cannot run."""
    from automodel_cli.errors import UserError

    if not cfg.train.eval_generate:
        return
    hint = "Set train.eval_generate=false (validation still reports loss and teacher-forced exact match)."
    if vision:
        raise UserError("train.eval_generate=true generates from text prompts only, and this model is a "
                        "vision-language model whose validation samples carry images.", hint)
    for key, degree in (("distributed.pp", shape.pp), ("distributed.cp", shape.cp)):
        if degree > 1:
            raise UserError(f"train.eval_generate=true cannot run with {key}={degree}: decoding needs every "
                            "layer of the model and whole sequences on each rank.",
                            f"{hint} Or set {key}=1 (FSDP2 and tensor parallelism generate: every rank decodes "
                            "the same batch).")


def generation_validation(run: Any, model: Any, data: SFTData, tokenizer: Any) -> Callable[[], dict[str, float]]:
    """``train.eval_generate``: greedy answers to the prompts of the first
    ``train.eval_generate_samples`` validation samples (``train.eval_max_new_tokens`` at most),
    scored as ``eval_generate_exact_match`` and ``eval_generate_contains``. Every rank generates
    the same batches and keeps decoding until all have finished (sharded forwards are
    collective)."""
    from automodel_cli.components.training.generation import answer_samples, generate_answers

    train = run.cfg.train
    samples = answer_samples(data.eval[:train.eval_generate_samples], tokenizer)

    def generate() -> dict[str, float]:
        return generate_answers(model, tokenizer, samples, batch_size=train.micro_batch_size * 4,
                                max_new_tokens=train.eval_max_new_tokens, device=run.precision.device,
                                autocast=run.precision.autocast, synced=run.env.world_size > 1).metrics()

    return generate
