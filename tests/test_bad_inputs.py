"""A corpus of bad inputs: config, data, model, checkpoint, launcher and plugin mistakes.

Every case must exit with code 2, print no traceback, name the problem (the fragments), and
leave an existing run directory byte-identical; a new output directory named by the command
must not be left behind. The cases run in-process through the real CLI, and most stop in the
cheap checks that run before any model loads, so the whole corpus stays fast.

Placeholders in the arguments: ``{run}`` a finished run with a checkpoint (shared by all cases,
compared byte for byte after each), ``{new}`` an output directory that must not appear,
``{tmp}`` the case's scratch directory, ``{data}`` a valid instruction data file, ``{ckpt}``
the run's checkpoint.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from model_dirs import remote_code_model, reshape_tensor, save_model, save_sharded_model, weight_reading_model
from vlm_models import gemma3_model_dir, write_colour_chat

from automodel_cli import hookimpl
from automodel_cli.assets import demo_dir
from automodel_cli.errors import UserError
from automodel_cli.plugins.models import DEMO_DEFAULTS

FAST = ["train.max_steps=1", "train.global_batch_size=4", "train.micro_batch_size=4", "train.eval_every_steps=null",
        "data.eval_split=null", "logging.progress=false"]


@dataclass
class Case:
    id: str
    args: list[str]
    fragments: list[str]
    setup: Callable[[Path], None] | None = None
    plugin: object | None = None
    env: dict[str, str] = field(default_factory=dict)
    secret: str | None = None  # a credential in the arguments that must be printed nowhere


# ----------------------------------------------------------------------------- setups
def write(relative: str, text: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        path = tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return setup


def jsonl(relative: str, rows: list[dict]) -> Callable[[Path], None]:
    return write(relative, "".join(json.dumps(row) + "\n" for row in rows))


def model_dir(relative: str, *, config: bool = True, weights: bool = False) -> Callable[[Path], None]:
    """A copy of the demo model directory, with or without config.json and weights."""
    def setup(tmp: Path) -> None:
        target = tmp / relative
        shutil.copytree(demo_dir(), target, ignore=shutil.ignore_patterns("*.jsonl", "*.py"))
        if not config:
            (target / "config.json").unlink()
        if weights:
            (target / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    return setup


def saved_model(relative: str, damage: str | None = None) -> Callable[[Path], None]:
    """A real save_pretrained model directory, then damaged the way copies get damaged."""
    def setup(tmp: Path) -> None:
        directory = tmp / relative
        if damage == "remote-code":
            remote_code_model(directory)
            return
        if damage == "unsafe-pickle":
            save_model(directory, bin_state={"weight": RunsCode()})
            return
        if damage == "shard-missing":
            save_sharded_model(directory, shards=3)
            sorted(directory.glob("model-*.safetensors"))[1].unlink()
            return
        if damage == "reads-weights-at-init":
            weight_reading_model(directory)
            return
        save_model(directory)
        weights = directory / "model.safetensors"
        if damage == "truncated":
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        elif damage == "no-config":
            (directory / "config.json").unlink()
        elif damage == "wrong-shape":
            reshape_tensor(directory, "model.layers.1.mlp.up_proj.weight", (300, 128))
    return setup


class RunsCode:
    """Unpickling this would run a shell command: what a refused pickle carries."""

    def __reduce__(self):
        import os

        return os.system, ("touch /tmp/automodel-corpus-pickle-ran",)


def both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        for each in setups:
            each(tmp)
    return setup


def vlm_inputs(damage: str | None = None, *, model: bool = True) -> Callable[[Path], None]:
    """A tiny Gemma 3 VLM in ``m/`` (with ``model``) and image-text chat data in ``d/train.jsonl``
    (four rows, images beside it), then damaged: row 3's image ``missing`` or a text file
    (``not-an-image``), or row 2's text holding an image token of its own (``extra-image-token``)."""
    def setup(tmp: Path) -> None:
        if model:
            gemma3_model_dir(tmp / "m")
        data = write_colour_chat(tmp / "d", 4)
        rows = [json.loads(line) for line in data.read_text().splitlines()]
        if damage == "missing":
            rows[2]["messages"][0]["content"][0]["path"] = "missing.png"
        elif damage == "not-an-image":
            (tmp / "d" / "notes.png").write_text("not an image")
            rows[2]["messages"][0]["content"][0]["path"] = "notes.png"
        elif damage == "extra-image-token":
            rows[1]["messages"][0]["content"][1]["text"] = "colour of <start_of_image>?"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return setup


ROWS = [{"prompt": f"reverse: ab{i}", "completion": f"{i}ba"} for i in range(8)]


# ----------------------------------------------------------------------------- plugins
class FailingDataset:
    """A plugin dataset whose factory reports a user error through the documented type."""

    @hookimpl
    def register_datasets(self, registry):
        def build(path, split, options):
            raise UserError("corpus-dataset needs data.options.split_ratio.", "Set data.options.split_ratio=0.9.")
        registry.add("corpus-dataset", build, description="fails with a UserError")


class ShadowingLoss:
    """A second plugin registering an existing loss name without override=True."""

    @hookimpl
    def register_losses(self, registry):
        registry.add("corpus-loss", "automodel_cli.components.loss.masked_ce:masked_ce")


class ShadowingLossAgain:
    @hookimpl
    def register_losses(self, registry):
        registry.add("corpus-loss", "automodel_cli.components.loss.masked_ce:masked_ce")


class RefusingLoss:
    """A plugin loss whose check refuses this machine (as a kernel loss refuses one without a GPU)."""

    @hookimpl
    def register_losses(self, registry):
        from automodel_cli.components.loss.spec import LossSpec

        def needs_a_tpu(device):
            raise UserError(f"corpus-tpu-loss needs a TPU; this run is on {device}.", "Use loss.name=masked_ce.")
        registry.add("corpus-tpu-loss", LossSpec(kind="logits", fn="automodel_cli.components.loss.masked_ce:"
                                                 "masked_cross_entropy", check=needs_a_tpu))


# ------------------------------------------------------------------------------- cases
FT = ["finetune", "demo"]

CASES = [
    # config: keys, types, choices, ranges, files
    Case("key-typo", [*FT, "train.max_step=5"], ["unknown key `train.max_step`", "Did you mean `train.max_steps`?"]),
    Case("section-typo", [*FT, "traing.seed=1"], ["unknown key `traing`", "Did you mean `train`?"]),
    Case("wrong-type", [*FT, "train.max_steps=abc"], ["`train.max_steps` must be an integer or null", "'abc'"]),
    Case("choice-typo", [*FT, "model.dtype=bfloat61"], ["must be one of auto, float32, bfloat16, float16", "`bfloat16`"]),
    Case("schedule-typo", [*FT, "optim.scheduler=cosin"], ["`optim.scheduler` names unknown learning-rate schedule `cosin`", "`cosine`"]),
    Case("optimizer-typo", [*FT, "optim.name=adamw9bit"], ["`optim.name` names unknown optimizer `adamw9bit`", "`adamw8bit`"]),
    Case("peft-typo", [*FT, "--peft", "lorra"], ["`peft.method` must be one of none, lora, dora", "`lora`"]),
    Case("max-steps-negative", [*FT, "train.max_steps=-1"], ["`train.max_steps` must be >= 1 (or null), got -1"]),
    Case("micro-batch-zero", [*FT, "train.micro_batch_size=0"], ["`train.micro_batch_size` must be >= 1, got 0"]),
    Case("global-batch-zero", [*FT, "train.global_batch_size=0"], ["`train.global_batch_size` must be >= 1, got 0"]),
    Case("lr-negative", [*FT, "optim.lr=-1"], ["`optim.lr` must be > 0 (or null), got -1"]),
    Case("lr-nan", [*FT, "optim.lr=.nan"], ["`optim.lr` must be a finite number"]),
    Case("betas-one", [*FT, "optim.betas=[0.9]"], ["`optim.betas` must be two numbers 0 <= b < 1"]),
    Case("lora-rank-zero", [*FT, "peft.rank=0"], ["`peft.rank` must be >= 1"]),
    Case("dp-shard-zero", [*FT, "distributed.dp_shard=0"], ["`distributed.dp_shard` must be -1"]),
    Case("keep-zero", [*FT, "checkpoint.keep=0"], ["`checkpoint.keep` must be >= 1"]),
    Case("seed-negative", [*FT, "train.seed=-1"], ["`train.seed` must be 0 <= x <= 4294967295"]),
    Case("many-at-once", [*FT, "train.max_steps=0", "optim.lr=0", "peft.rank=0"], ["3 problems"]),
    Case("yaml-syntax", [*FT, "-c", "{tmp}/bad.yaml"], ["bad.yaml line 4", "not valid YAML", "starts at line 3"],
         setup=write("bad.yaml", "train:\n  max_steps: 3\n  seed: [1, 2\n")),
    Case("yaml-not-mapping", [*FT, "-c", "{tmp}/list.yaml"], ["must be a mapping of sections"],
         setup=write("list.yaml", "- train\n- optim\n")),
    Case("yaml-missing", [*FT, "-c", "{tmp}/nope.yaml"], ["nope.yaml` does not exist"]),
    Case("yaml-directory", [*FT, "-c", "{tmp}"], ["is a directory"]),
    Case("yaml-key-line", [*FT, "-c", "{tmp}/run.yaml"], ["run.yaml:4: unknown key `optim.learning_rate`"],
         setup=write("run.yaml", "train:\n  max_steps: 3\noptim:\n  learning_rate: 0.1\n")),
    Case("override-no-equals", ["finetune", "train.max_steps"], ["looks like a config override missing `=`"]),
    Case("override-no-equals-2nd", [*FT, "optim.lr"], ["`optim.lr` looks like a config override missing `=`"]),
    Case("preset-typo", ["finetune", "llama4"], ["Unknown model preset `llama4`", "Did you mean `llama3`?"]),
    Case("two-targets", [*FT, "qwen3"], ["Unexpected argument `qwen3`"]),
    Case("recipe-mismatch", [*FT, "-c", "{tmp}/p.yaml"], ["this config is for the `pretrain` recipe"],
         setup=write("p.yaml", "recipe: pretrain\n")),
    # registry names
    Case("loss-unknown", [*FT, "loss.name=nope"], ["unknown loss `nope`"]),
    Case("loss-option-range", [*FT, "loss.name=linear_ce", "loss.linear_ce.chunk_size=0", "-o", "{new}"],
         ["`loss.linear_ce.chunk_size` must be >= 1 (or null), got 0"]),
    Case("dataset-typo", [*FT, "data.name=sqaud"], ["Did you mean `squad`?"]),
    Case("logger-typo", [*FT, "logging.loggers=[tensorbord]"], ["unknown logger `tensorbord`", "`tensorboard`"]),
    Case("launcher-typo", [*FT, "--launcher", "slurmm"], ["unknown launcher `slurmm`", "`slurm`"]),
    # output directory
    Case("output-proc", [*FT, "-o", "/proc/automodel-corpus", *FAST], ["cannot be created or written"]),
    Case("output-under-file", [*FT, "-o", "{tmp}/file/run", *FAST], ["Not a directory"], setup=write("file", "x")),
    Case("output-is-file", [*FT, "-o", "{tmp}/file", *FAST], ["exists and is not a directory"], setup=write("file", "x")),
    Case("run-exists", [*FT, "-o", "{run}", *FAST], ["already holds a run", "checkpoint.resume=auto"]),
    Case("resume-other-run", [*FT, "-o", "{run}", "checkpoint.resume=auto", *FAST, "train.seed=7"],
         ["holds a different run", "train.seed"]),
    Case("resume-changed-lr", [*FT, "-o", "{run}", "checkpoint.resume=auto", *FAST, "optim.lr=1e-2"],
         [f"optim.lr: saved {DEMO_DEFAULTS['optim']['lr']}, now 0.01", "checkpoint.allow_changes=true"]),
    Case("resume-auto-no-dir", [*FT, "checkpoint.resume=auto", *FAST], ["needs the output_dir"]),
    # data
    Case("data-missing", ["finetune", "demo", "data.name=auto", "data.path={tmp}/nope.jsonl", "-o", "{new}", *FAST],
         ["nope.jsonl"]),
    Case("data-malformed", [*FT, "data.name=instruction", "data.path={tmp}/d.jsonl", "-o", "{new}", *FAST],
         ["d.jsonl line 2"], setup=write("d.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": \n')),
    Case("data-columns", [*FT, "data.name=instruction", "data.path={tmp}/d.jsonl", "-o", "{new}", *FAST],
         ["question", "data.prompt_column"], setup=jsonl("d.jsonl", [{"question": "a", "answer": "b"}] * 4)),
    Case("data-empty", [*FT, "data.name=instruction", "data.path={tmp}/d.jsonl", "-o", "{new}", *FAST], ["empty"],
         setup=write("d.jsonl", "")),
    Case("data-all-masked", [*FT, "data.name=instruction", "data.path={tmp}/d.jsonl", "data.max_length=8", "-o",
                             "{new}", *FAST], ["data.max_length"],
         setup=jsonl("d.jsonl", [{"prompt": "reverse: abcdefghij" * 3, "completion": "x"}] * 4)),
    Case("batch-not-multiple", [*FT, "train.global_batch_size=6", "train.micro_batch_size=4", "train.max_steps=1",
                                "-o", "{new}"], ["multiple of"]),
    # model
    Case("model-missing", ["finetune", "model.path={tmp}/nope", "data.path={data}", "-o", "{new}", *FAST],
         ["does not exist", "model.path"]),
    Case("model-config-field", [*FT, "model.config.not_a_field=1", "-o", "{new}", *FAST],
         ["`model.config.not_a_field` is not a field of the llama config"]),
    Case("model-no-weights", ["finetune", "model.path={tmp}/m", "data.path={data}", "-o", "{new}", *FAST],
         ["no weights", "model.from_scratch=true"], setup=model_dir("m")),
    Case("model-truncated-weights", ["finetune", "model.path={tmp}/m", "data.path={data}", "-o", "{new}", *FAST],
         ["model.safetensors` (model.path) is corrupt or truncated"], setup=saved_model("m", "truncated")),
    Case("model-unsafe-pickle", ["finetune", "model.path={tmp}/m", "data.path={data}", "-o", "{new}", *FAST],
         ["pytorch_model.bin` (model.path): unsafe pickle refused"], setup=saved_model("m", "unsafe-pickle")),
    Case("model-shard-missing", ["finetune", "model.path={tmp}/m", "data.path={data}", "-o", "{new}", *FAST],
         ["model.safetensors.index.json lists 3 weight files and 1 are missing", "model-00002-of-00003.safetensors"],
         setup=saved_model("m", "shard-missing")),
    Case("model-wrong-shape", ["finetune", "model.path={tmp}/m", "data.path={data}", "-o", "{new}", *FAST],
         ["`model.layers.1.mlp.up_proj.weight`", "model.safetensors has shape [300, 128]", "[352, 128]"],
         setup=saved_model("m", "wrong-shape")),
    Case("model-not-on-meta", ["finetune", "model.path={tmp}/m", "data.path={data}", "model.trust_remote_code=true",
                               "model.from_scratch=true", "-o", "{new}", *FAST],
         ["cannot be built on the meta device", "model.meta_init=false"],
         setup=saved_model("m", "reads-weights-at-init")),
    Case("model-no-config", ["finetune", "model.path={tmp}/m", "data.path={data}", "-o", "{new}", *FAST],
         ["config.json"], setup=saved_model("m", "no-config")),
    Case("model-remote-code", ["finetune", "model.path={tmp}/m", "data.path={data}", "-o", "{new}", *FAST],
         ["model.trust_remote_code=true"], setup=saved_model("m", "remote-code")),
    Case("model-data-dir", ["finetune", "model.path={tmp}", "data.path={data}", "-o", "{new}", *FAST],
         ["config.json"]),
    Case("hub-offline", ["finetune", "model.path=someorg/not-cached-anywhere", "data.path={data}", "-o", "{new}", *FAST],
         ["someorg/not-cached-anywhere", "HF_HUB_OFFLINE"], env={"HF_HUB_OFFLINE": "1"}),
    Case("vlm-image-missing", ["finetune", "model.path={tmp}/m", "data.path={tmp}/d/train.jsonl", "-o", "{new}", *FAST],
         ["train.jsonl` row 3", "image file `missing.png` does not exist"], setup=vlm_inputs("missing")),
    Case("vlm-not-an-image", ["finetune", "model.path={tmp}/m", "data.path={tmp}/d/train.jsonl", "-o", "{new}", *FAST],
         ["train.jsonl` row 3", "notes.png` cannot be read as an image"], setup=vlm_inputs("not-an-image")),
    Case("vlm-image-token-in-text", ["finetune", "model.path={tmp}/m", "data.path={tmp}/d/train.jsonl", "-o", "{new}",
                                     *FAST], ["row 2", "1 image(s) but the rendered text has 2 image placeholder(s)"],
         setup=vlm_inputs("extra-image-token")),
    Case("vlm-template-no-lists", ["finetune", "model.path={tmp}/m", "data.path={tmp}/d/train.jsonl", "-o", "{new}",
                                   "model.chat_template={{% for m in messages %}}{{{{ m['role'] + ': ' + m['content'] }}}}"
                                   "{{% endfor %}}", *FAST],
         ["cannot render message contents that are lists of parts", "model.chat_template"], setup=vlm_inputs()),
    Case("images-to-text-model", [*FT, "data.name=auto", "data.path={tmp}/d/train.jsonl", "-o", "{new}", *FAST],
         ["contains images, but the model is text-only"], setup=vlm_inputs(model=False)),
    Case("vlm-data-text-model", [*FT, "data.name=vlm", "data.path={tmp}/d/train.jsonl", "-o", "{new}", *FAST],
         ["data.name=vlm reads image-text data, but the model", "is text-only"], setup=vlm_inputs(model=False)),
    Case("teacher-truncated", ["distill", "demo", "distill.teacher_path={tmp}/t", "-o", "{new}", *FAST],
         ["distill.teacher_path", "corrupt or truncated"], setup=saved_model("t", "truncated")),
    # checkpoints
    Case("resume-path-missing", [*FT, "-o", "{new}", "checkpoint.resume={tmp}/nope", *FAST], ["does not exist"]),
    Case("resume-not-checkpoint", [*FT, "-o", "{new}", "checkpoint.resume={tmp}", *FAST], ["is not a checkpoint"]),
    Case("inspect-not-checkpoint", ["checkpoint", "inspect", "{tmp}"], ["is not a checkpoint"]),
    Case("consolidate-out-not-empty", ["checkpoint", "consolidate", "{ckpt}", "--out", "{tmp}/out"],
         ["{tmp}/out already exists and is not empty; nothing was written"],
         setup=write("out/keep.txt", "mine")),
    Case("consolidate-bad-size", ["checkpoint", "consolidate", "{ckpt}", "--out", "{new}", "--max-shard-size", "big"],
         ["--max-shard-size 'big' is not a size"]),
    # launchers
    Case("nodes-local", [*FT, "--nodes", "2", "-o", "{new}"], ["--launcher slurm"]),
    Case("gpus-nproc-disagree", [*FT, "--gpus-per-node", "2", "--nproc-per-node", "4"], ["disagree"]),
    Case("mesh-does-not-fit", [*FT, "--nproc-per-node", "2", "distributed.tp=3", "-o", "{new}", "--dry-run"],
         ["distributed.tp=3 does not fit 2 process(es)"]),
    Case("slurm-option-typo", [*FT, "--launcher", "slurm", "launch.slurm.partitoin=gpu", "-o", "{new}", "--dry-run"],
         ["unknown option `launch.slurm.partitoin` of the launcher `slurm`", "`launch.slurm.partition`"]),
    Case("k8s-option-range", [*FT, "--launcher", "k8s", "launch.k8s.backoff_limit=-1", "-o", "{new}", "--dry-run"],
         ["`launch.k8s.backoff_limit` must be >= 0, got -1"]),
    Case("slurm-option-range", [*FT, "--launcher", "slurm", "launch.slurm.max_requeues=-1", "-o", "{new}", "--dry-run"],
         ["`launch.slurm.max_requeues` must be >= 0, got -1"]),
    Case("slurm-token-literal", [*FT, "--launcher", "slurm", "launch.env.HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyz0123456789",
                                 "-o", "{new}", "--dry-run"], ["`launch.env.HF_TOKEN`", "holds a credential"],
         secret="hf_abcdefghijklmnopqrstuvwxyz0123456789"),
    Case("cluster-no-data", ["finetune", "model.path={tmp}/m", "--launcher", "slurm", "--gpus-per-node", "1",
                             "-o", "{new}", "--dry-run"], ["data.path"], setup=model_dir("m", weights=True)),
    Case("cluster-gpu-sized-no-gpus", ["finetune", "llama3.1-8b", "data.path={data}", "--launcher", "slurm", "--nodes",
                                       "4", "-o", "{new}", "--dry-run"], ["--gpus-per-node"]),
    # other recipes
    Case("distill-no-teacher-dir", ["distill", "demo", "distill.teacher_path={tmp}/none", "-o", "{new}", *FAST],
         ["Teacher directory `{tmp}/none` does not exist (distill.teacher_path)"]),
    Case("distill-temperature", ["distill", "demo", "distill.temperature=0"], ["`distill.temperature` must be > 0"]),
    Case("benchmark-seq-len", ["benchmark", "demo", "benchmark.seq_len=1"], ["`benchmark.seq_len` must be >= 2"]),
    # plugins
    Case("plugin-user-error", [*FT, "data.name=corpus-dataset", "-o", "{new}", *FAST],
         ["corpus-dataset needs data.options.split_ratio"], plugin=FailingDataset()),
    Case("plugin-collision", [*FT, "loss.name=corpus-loss", "-o", "{new}", *FAST],
         ["corpus-loss", "registered by both"], plugin=(ShadowingLoss(), ShadowingLossAgain())),
    Case("plugin-loss-check", [*FT, "loss.name=corpus-tpu-loss", "-o", "{new}", *FAST],
         ["corpus-tpu-loss needs a TPU; this run is on cpu"], plugin=RefusingLoss()),
]


# ------------------------------------------------------------------------------ harness
def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory) -> Path:
    """A finished run with one checkpoint, the directory every case must leave untouched."""
    from automodel_cli.cli import main

    run = tmp_path_factory.mktemp("existing") / "run"
    assert main(["finetune", "demo", "-o", str(run), *FAST, "train.max_steps=2", "checkpoint.every_steps=2"]) == 0
    return run


def test_the_corpus_is_large_and_covers_every_area():
    assert len(CASES) >= 50
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case, cli, existing_run, automodel_plugin, tmp_path, monkeypatch):
    before = snapshot(existing_run)
    new = tmp_path / "new-output"
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    if case.setup:
        case.setup(tmp_path)
    for plugin in case.plugin if isinstance(case.plugin, tuple) else [case.plugin] if case.plugin else []:
        automodel_plugin(plugin)
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    places = {"run": existing_run, "new": new, "tmp": tmp_path, "data": data,
              "ckpt": existing_run / "checkpoints" / "step_00000002"}
    result = cli(*[arg.format(**places) for arg in case.args])

    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert case.secret is None or case.secret not in result.stderr + result.stdout
    message = " ".join(result.stderr.split())
    for fragment in case.fragments:
        assert " ".join(fragment.format(**places).split()) in message, message
    assert snapshot(existing_run) == before
    assert not new.exists(), sorted(p.name for p in new.iterdir())
    assert not Path("/tmp/automodel-corpus-pickle-ran").exists()  # no pickle payload ever runs
