"""The frozen teacher of a distillation run, as a component any recipe can use.

``check_teacher_settings`` runs before anything loads (a teacher is given; a resumed run keeps
its teacher and KD settings); ``teacher_model_config`` checks ``distill.teacher_path`` like a
model directory (errors name that key); ``check_vocabularies`` compares the teacher's vocabulary
with the student's before any model loads; ``FrozenTeacher`` loads it frozen and in eval mode,
sharded on the student's mesh with its parameters freed after every forward, and gives its
logits. The demo student without a teacher gets the cached demo teacher
(``use_demo_teacher`` / ``provide_demo_teacher``; ``training/demo_teacher.py``).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from automodel_cli.components.models.model_files import Role
from automodel_cli.errors import UserError
from automodel_cli.run_layout import RunDir

#: Settings a resumed distillation must share with the run it continues (besides finetune's).
TEACHER_IDENTITY_KEYS = ("distill.teacher_path", "distill.teacher_revision", "distill.temperature",
                         "distill.kd_weight", "distill.kl")

#: Messages about the teacher name the distill keys. Custom code is allowed by the one
#: model.trust_remote_code key, which covers both models.
TEACHER = Role(name="teacher", path_key="distill.teacher_path", tokenizer_key="distill.teacher_tokenizer",
               trust_note=" (the teacher has no key of its own: model.trust_remote_code applies to the student "
                          "and the teacher)",
               from_scratch_key=None)



def is_demo_model(cfg: Any) -> bool:
    """Whether ``model.*`` is the bundled demo model as its preset sets it (random init)."""
    from automodel_cli.assets import demo_dir

    return bool(cfg.model.path) and Path(cfg.model.path).resolve() == demo_dir() and cfg.model.from_scratch


def use_demo_teacher(cfg: Any, registries: Any) -> Path | None:
    """For the demo student without a teacher, ``distill.teacher_path`` becomes the cached demo
    teacher (``automodel finetune demo``, trained on first use by ``provide_demo_teacher``), so
    ``automodel distill demo`` runs by itself; returns its cache entry, else None."""
    from automodel_cli.training import demo_teacher
    from automodel_cli.config.yaml_io import Source

    if cfg.distill.teacher_path or not is_demo_model(cfg):
        return None
    entry = demo_teacher.cache_entry(registries)
    cfg.tree["distill"]["teacher_path"] = str(demo_teacher.model_dir(entry))
    cfg.sources["distill.teacher_path"] = Source("the cached demo teacher")
    return entry


def provide_demo_teacher(entry: Path, env: Any, say: Any) -> None:
    """Train the demo teacher unless it is cached: once per machine (the first process of each
    node; the others wait here)."""
    from automodel_cli.training import demo_teacher
    from automodel_cli.training.loop import barrier

    if env.local_rank == 0:
        demo_teacher.ensure_teacher(entry, say)
    barrier(env)


def check_teacher_settings(cfg: Any) -> None:
    """A teacher is given (the schema checks types, choices and ranges), and a resumed run keeps
    its teacher and KD settings (finetune's keys are checked when the run directory is claimed)."""
    settings = cfg.distill
    if not settings.teacher_path:
        raise UserError(
            "automodel distill needs a teacher model, and distill.teacher_path is not set.",
            "Set distill.teacher_path to a Hugging Face model directory or hub id that uses the "
            "student's tokenizer (a finetune run's model is RUN_DIR/final). `automodel distill demo` "
            "brings its own teacher.",
        )
    if cfg.output_dir and cfg.checkpoint.resume not in (None, False, "off", "none", ""):
        check_same_distillation(cfg, Path(cfg.output_dir))


def check_same_distillation(cfg: Any, output_dir: Path, keys: tuple[str, ...] = TEACHER_IDENTITY_KEYS) -> None:
    """A resumed run must keep its teacher and KD settings (finetune's keys are checked by
    ``prepare_output_dir``); another recipe passes its own ``keys``."""
    from automodel_cli.config.schema import get_dotted
    from automodel_cli.config.yaml_io import load_yaml_file

    saved_path = RunDir(output_dir).config
    if not saved_path.exists():
        return
    saved, _ = load_yaml_file(saved_path)
    differences = [f"{key}: saved {get_dotted(saved, key)!r}, now {cfg.get(key)!r}"
                   for key in keys if get_dotted(saved, key) != cfg.get(key)]
    if differences:
        raise UserError(
            f"output_dir `{output_dir}` holds a different run, so it cannot be resumed with these "
            f"settings ({'; '.join(differences)}).",
            "Resume with the original settings, or start a new run in another --output-dir.",
        )


def teacher_model_config(cfg: Any) -> Any:
    """The teacher as a ``model`` section for ``load_model``, checked here (directory, config,
    custom code, weight files, or the hub for a hub id) so that errors name
    ``distill.teacher_path`` and come before any data or model is loaded."""
    from automodel_cli.components.models.loading import check_model_source

    teacher_cfg = SimpleNamespace(
        path=cfg.distill.teacher_path, revision=cfg.distill.teacher_revision, from_scratch=False, config={},
        trust_remote_code=cfg.model.trust_remote_code, attn_implementation=cfg.model.attn_implementation,
        tokenizer=cfg.distill.teacher_tokenizer, chat_template=None, role=TEACHER, meta_init=cfg.model.meta_init,
    )
    check_model_source(teacher_cfg, weights=True)
    return teacher_cfg


def _teacher_tokenizer(teacher_cfg: Any) -> Any:
    """The teacher's tokenizer: ``distill.teacher_tokenizer`` (must load), else whatever
    ``distill.teacher_path`` holds (None when it has no tokenizer)."""
    from transformers import AutoTokenizer

    from automodel_cli.components.models.loading import looks_like_local_path, source_access

    explicit = teacher_cfg.tokenizer is not None
    source = teacher_cfg.tokenizer if explicit else teacher_cfg.path
    revision = None if explicit else teacher_cfg.revision
    if looks_like_local_path(source):
        source = str(Path(source).expanduser())
    key = teacher_cfg.role.tokenizer_key if explicit else teacher_cfg.role.path_key
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=teacher_cfg.trust_remote_code,
                                             revision=revision, **source_access(source, revision, key))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        if not explicit:
            return None
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"Could not load the teacher tokenizer `{source}` ({first_line}) "
                        f"(distill.teacher_tokenizer).",
                        "Point it at a tokenizer directory or hub id, or leave it unset.") from None


def _vocab_size(config: Any) -> int:
    from automodel_cli.components.models.structure import text_config

    text = text_config(config)
    return int(getattr(text, "vocab_size", None) or getattr(config, "vocab_size"))


def check_vocabularies(student_config: Any, tokenizer: Any, teacher_cfg: Any, say: Any) -> int:
    """Teacher and student must score the same tokens: the same tokenizer vocabulary (when the
    teacher has a tokenizer) and the same number of logits, or a different number only when the
    tokenizers are verified identical and both cover them (embeddings padded to different sizes,
    e.g. Qwen2.5 7B vs 0.5B). Returns the number of logits to compare."""
    from automodel_cli.components.models.loading import load_config

    teacher_config = load_config(teacher_cfg)  # its errors name distill.teacher_path
    student_vocab, teacher_vocab = _vocab_size(student_config), _vocab_size(teacher_config)
    teacher_tokenizer = _teacher_tokenizer(teacher_cfg)
    if teacher_tokenizer is not None:
        student_ids, teacher_ids = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        if student_ids != teacher_ids:
            examples = [f"`{token}` is {teacher_ids.get(token, 'missing')} for the teacher and "
                        f"{student_ids.get(token, 'missing')} for the student"
                        for token in sorted(set(student_ids) | set(teacher_ids), key=lambda t: (
                            min(student_ids.get(t, 1 << 62), teacher_ids.get(t, 1 << 62)), t))
                        if student_ids.get(token) != teacher_ids.get(token)][:2]
            raise UserError(
                f"The teacher and the student use different vocabularies: the teacher's tokenizer has "
                f"{len(teacher_tokenizer)} tokens (model vocab_size {teacher_vocab}) and the student's "
                f"{len(tokenizer)} (model vocab_size {student_vocab}), and token ids differ "
                f"({'; '.join(examples)}), so their next-token distributions cannot be compared.",
                "Distil between models that share a tokenizer (one model family, e.g. Qwen2.5-7B -> "
                "Qwen2.5-0.5B), or choose a teacher or student with the other's tokenizer.",
            )
    if student_vocab == teacher_vocab:
        return student_vocab
    common = min(student_vocab, teacher_vocab)
    if teacher_tokenizer is not None and len(tokenizer) <= common:
        say(f"note: teacher and student share a tokenizer of {len(tokenizer)} tokens but have "
            f"{teacher_vocab} and {student_vocab} logits (padded embeddings); the KL compares the "
            f"first {common}.")
        return common
    raise UserError(
        f"The teacher and the student have different vocabularies: the teacher's model has "
        f"vocab_size {teacher_vocab} and the student's {student_vocab}, so their next-token "
        f"distributions cannot be compared token by token.",
        "Distil between models that share a tokenizer (one model family); if they do and only pad "
        "their embeddings differently, set distill.teacher_tokenizer to the teacher's tokenizer so it "
        "can be checked.",
    )



class FrozenTeacher:
    """The teacher model: frozen (no gradients, no optimizer, never checkpointed or saved), in
    eval mode, in ``distill.teacher_dtype``; built like the student (empty, then each process
    loads its shards), parallelised on the student's mesh (its TP plan, then FSDP2 resharding
    after every forward, since no backward follows)."""

    def __init__(self, teacher_cfg: Any, run: Any, dtype: Any = None):
        from automodel_cli.components.models.loading import torch_dtype
        from automodel_cli.training.model_setup import build_model

        cfg = run.cfg  # dtype: a torch dtype (default distill.teacher_dtype)
        self.dtype = dtype if dtype is not None else torch_dtype(cfg.distill.teacher_dtype, run.env.device.type)
        self.model = build_model(cfg, teacher_cfg, precision=run.precision, mesh=run.mesh, shape=run.shape,
                                 registries=run.registries, sequence_parallel=run.sequence_parallel,
                                 dtype=self.dtype, trainable=False, say=run.say)
        self.parameters = sum(p.numel() for p in self.model.parameters())

    def logits(self, inputs: dict[str, Any]) -> Any:
        """The teacher's logits for model ``inputs`` (already on the device), without gradients."""
        import torch

        with torch.no_grad():  # in the teacher's own dtype
            return self.model(**inputs, use_cache=False).logits

    def describe(self) -> str:
        return f"{self.parameters / 1e6:.2f}M parameters, frozen, {str(self.dtype).replace('torch.', '')}"
