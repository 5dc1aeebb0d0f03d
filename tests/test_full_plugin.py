"""A plugin written from docs/plugins.md alone, installed by pip, exercising every registry kind.

``tests/fixtures/full_plugin`` (distribution automodel-full-plugin 1.2.3) registers a recipe
with its own config section on ``TrainingRun``, a model preset shipping its model directory, a
dataset, a loss, a launcher and a logger with options, and a tensor-parallel plan for a model
type automodel has none for (Granite). Every command runs in a subprocess that finds the plugin
through its entry point, as a user's would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from automodel_cli.components.logging import read_metrics
from conftest import one_line, run_cli, tree_digest
from plugin_packages import FULL, install_plugins
from tolerances import first_loss_tolerance

DISTRIBUTION = ("automodel-full-plugin", "1.2.3")
#: listing -> the plugin's entry in it.
ENTRIES = {"recipes": "finetune_frozen", "models": "tiny-granite", "datasets": "copy", "losses": "scaled_ce",
           "parallel-plans": "granite", "launchers": "nice", "loggers": "tsv"}
#: The preset's tiny Granite (tiny_granite/config.json), for float32 tolerances of its losses.
TINY_GRANITE = {"layers": 2, "hidden": 64, "intermediate": 128, "vocab": 64}
#: A short run of the plugin's recipe on its preset, with its dataset and loss.
RUN = ("finetune_frozen", "tiny-granite", "loss.name=scaled_ce", "data.copy.samples=48", "logging.progress=false")


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    return install_plugins(tmp_path_factory.mktemp("site"), FULL)


def metrics(run: Path) -> list[dict]:
    return read_metrics(run / "metrics.jsonl")


def test_every_kind_is_listed_with_the_plugins_distribution(plugin_env):
    for listing, name in ENTRIES.items():
        result = run_cli("list", listing, "--json", env=plugin_env)
        assert result.exit_code == 0, result.stderr
        entry = next(e for e in json.loads(result.stdout) if e["name"] == name)
        assert (entry["distribution"], entry["version"], entry["plugin"]) == (*DISTRIBUTION, "full"), entry
    plugins = {p["name"]: p for p in json.loads(run_cli("plugins", "list", "--json", env=plugin_env).stdout)}
    assert plugins["full"]["status"] == "loaded" and len(plugins["full"]["hooks"]) == 7
    assert "full" not in run_cli("plugins", "doctor", env=plugin_env).stdout  # no problem reported


def test_config_show_has_the_recipe_section_and_every_option_with_its_default(plugin_env):
    result = run_cli("config", "show", "tiny-granite", "--recipe", "finetune_frozen", "loss.name=scaled_ce",
                     "logging.loggers=[tsv]", "launch.launcher=nice", env=plugin_env)
    assert result.exit_code == 0, result.stderr
    shown, plugin = one_line(result.stdout), "(automodel-full-plugin 1.2.3)"
    assert f"frozen: layers: 1 # from preset tiny-granite for finetune_frozen {plugin}" in shown
    assert f"name: copy # from preset tiny-granite {plugin}" in shown
    for option, kind in (("samples: 256", "dataset copy"), ("length: 6", "dataset copy"),
                         ("scale: 1.0", "loss scaled_ce"), ("file: metrics.tsv", "logger tsv"),
                         ("columns: [loss]", "logger tsv"), ("niceness: 10", "launcher nice"),
                         ("log_file: job.log", "launcher nice")):
        assert f"{option} # from defaults of {kind} {plugin}" in shown, option
    # The section belongs to the recipe: the built-in finetune does not read it.
    other = run_cli("config", "show", "tiny-granite", "frozen.layers=1", env=plugin_env)
    assert other.exit_code == 2 and "`frozen` is read by the `finetune_frozen` recipe only" in one_line(other.stderr)


def test_bad_option_values_exit_2_naming_each_key_and_range(plugin_env, tmp_path):
    run = tmp_path / "run"
    result = run_cli(*RUN, "-o", str(run), "frozen.layers=-1", "data.copy.length=0", "loss.scaled_ce.scale=0",
                     "launch.nice.niceness=40", "--launcher", "nice", "logging.tsv.colums=[loss]",
                     "logging.loggers=[tsv]", env=plugin_env)
    message = one_line(result.stderr)
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    for problem in ("`frozen.layers` must be >= 0, got -1", "`data.copy.length` must be 1 <= x <= 20, got 0",
                    "`loss.scaled_ce.scale` must be 0 < x <= 100, got 0",
                    "`launch.nice.niceness` must be 0 <= x <= 19, got 40",
                    "unknown option `logging.tsv.colums` of the logger `tsv`. Did you mean `logging.tsv.columns`?"):
        assert problem in message, problem
    assert not run.exists()


def test_the_launcher_renders_its_command_with_its_option(plugin_env, tmp_path):
    result = run_cli(*RUN, "--launcher", "nice", "launch.nice.niceness=7", "--dry-run", env=plugin_env, cwd=tmp_path)
    assert result.exit_code == 0, result.stderr
    assert "# ---- nice: what would be submitted (nothing was) ----" in result.stdout
    assert "nice -n 7 " in result.stdout and "-m automodel_cli finetune_frozen " in result.stdout
    assert not any(tmp_path.iterdir())  # --dry-run writes nothing


def refuses_and_leaves_untouched(plugin_env, directory: Path, args: tuple[str, ...], message: str) -> None:
    """The recipe's UserError: exit code 2, its message, and ``directory`` byte-identical."""
    directory.mkdir(exist_ok=True)
    (directory / "notes.txt").write_text("mine")
    before = tree_digest(directory)
    result = run_cli(*RUN, *args, "-o", str(directory), env=plugin_env)
    assert result.exit_code == 2 and message in one_line(result.stderr), result.stderr
    assert tree_digest(directory) == before


def test_a_recipe_error_before_the_run_starts_leaves_the_directory_untouched(plugin_env, tmp_path):
    refuses_and_leaves_untouched(plugin_env, tmp_path, ("--peft", "lora"), "cannot combine with --peft lora")


@pytest.fixture(scope="module")
def single_process_run(plugin_env, tmp_path_factory):
    """The recipe on one process with scale 1: the reference of the runs below."""
    run = tmp_path_factory.mktemp("single") / "run"
    result = run_cli(*RUN, "train.max_steps=1", "-o", str(run), env=plugin_env)
    assert result.exit_code == 0, result.stderr
    return run


def loss_tolerance(loss: float, tokens: int) -> dict[str, float]:
    return first_loss_tolerance(loss, **TINY_GRANITE, positions=64, tokens=tokens)


@pytest.mark.slow
def test_every_entry_works_together_end_to_end(plugin_env, tmp_path, single_process_run):
    """The recipe on the preset's model and the dataset, with the loss, started by the launcher
    and logged by the logger: each option reaches its code."""
    run = tmp_path / "run"
    result = run_cli(*RUN, "--launcher", "nice", "launch.nice.niceness=7", "launch.nice.log_file=out.log",
                     "loss.scaled_ce.scale=3", "logging.loggers=[tsv]", "logging.tsv.columns=[loss,trainable_fraction]",
                     "train.log_every_steps=2", "train.max_steps=3", "-o", str(run), env=plugin_env)
    assert result.exit_code == 0, result.stderr
    assert "ended with exit code 0" in result.stdout
    job_log = (run / "launch" / "out.log").read_text()  # the launcher's option
    assert "train data: 48 samples" in job_log and "saved " in job_log  # the dataset's option

    steps = metrics(run)
    reference = metrics(single_process_run)[0]
    expected = 3 * reference["loss"]  # the loss's option
    assert steps[0]["loss"] == pytest.approx(expected, **loss_tolerance(expected, reference["tokens"]))
    table = (run / "metrics.tsv").read_text().splitlines()
    assert table[0].startswith("# model: ") and table[0].endswith("tiny_granite")  # from run_config
    assert table[1].split("\t") == ["step", "loss", "trainable_fraction"]
    assert [row.split("\t")[0] for row in table[2:]] == ["2", "3"]  # every 2nd step and the last
    assert [float(row.split("\t")[1]) for row in table[2:]] == [steps[1]["loss"], steps[2]["loss"]]

    summary = json.loads((run / "summary.json").read_text())
    assert summary["frozen_layers"] == 1  # the preset's value for this recipe
    assert 0 < steps[0]["trainable_fraction"] < 1
    assert_bottom_layer_frozen(run / "final" / "model.safetensors", seed=42)
    # Raised once TrainingRun holds the directory and the model is loaded: still nothing written.
    refuses_and_leaves_untouched(plugin_env, tmp_path / "unused", ("frozen.layers=2",),
                                 "frozen.layers=2 leaves nothing to train")


def assert_bottom_layer_frozen(weights: Path, seed: int) -> None:
    """The embeddings and layer 0 are the random initial weights; layer 1 and the head trained."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    trained = load_file(weights)
    torch.manual_seed(seed)
    initial = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(weights.parent), dtype=torch.float32).state_dict()
    for name, tensor in trained.items():
        frozen = name.startswith(("model.embed_tokens.", "model.layers.0."))
        assert torch.equal(tensor, initial[name]) == frozen, name


@pytest.mark.slow
def test_the_parallel_plan_shards_granite_exactly(plugin_env, tmp_path, single_process_run):
    """Two processes with tp=2 (the plugin's Granite plan; automodel has none) compute the single
    process's step-1 loss, to float32 rounding."""
    run = tmp_path / "tp"
    result = run_cli(*RUN, "--nproc-per-node", "2", "distributed.tp=2", "train.max_steps=1", "-o", str(run),
                     env=plugin_env)
    assert result.exit_code == 0, result.stderr
    assert "launching 2 processes" in result.stderr and "tp: 2" in (run / "config.yaml").read_text()
    reference = metrics(single_process_run)[0]
    assert metrics(run)[0]["loss"] == pytest.approx(reference["loss"], **loss_tolerance(reference["loss"], reference["tokens"]))
