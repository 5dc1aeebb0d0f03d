"""Recipes registered through the hook become top-level commands."""

from __future__ import annotations

import types

from automodel_cli import hookimpl

CALLS = []


def record_run(context):
    CALLS.append(context.config)
    return 0


def failing_run(context):
    return 3


@hookimpl
def register_recipes(registry):
    registry.add("toyrecipe", record_run, description="A recipe defined by a test.",
                 defaults={"train": {"max_steps": 5}})
    registry.add("toyfail", failing_run, description="A recipe that fails.")


PLUGIN = types.SimpleNamespace(__name__="toy_recipes", register_recipes=register_recipes)


def test_recipe_appears_in_help(automodel_plugin, cli):
    automodel_plugin(PLUGIN)
    result = cli("--help")
    assert "toyrecipe" in result.stdout and "A recipe defined by a test." in result.stdout


def test_recipe_receives_layered_config(automodel_plugin, cli, tmp_path):
    automodel_plugin(PLUGIN)
    CALLS.clear()
    config = tmp_path / "extra.yaml"
    config.write_text("optim:\n  lr: 0.01\n")
    result = cli("toyrecipe", "llama3", "-c", str(config), "--peft", "lora",
                 "train.seed=7", "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.stderr
    (cfg,) = CALLS
    assert cfg.train.max_steps == 5  # recipe defaults
    assert cfg.model.path == "meta-llama/Llama-3.2-1B-Instruct"
    assert cfg.optim.lr == 0.01 and cfg.train.seed == 7
    assert cfg.peft.method == "lora"
    assert cfg.output_dir == str(tmp_path / "out")
    assert str(cfg.source_of("peft.method")) == "command line `--peft`"


def test_recipe_dry_run_prints_config_and_runs_nothing(automodel_plugin, cli):
    automodel_plugin(PLUGIN)
    CALLS.clear()
    result = cli("toyrecipe", "model.path=/some/dir", "--dry-run")
    assert result.exit_code == 0
    assert "path: /some/dir  # from command line `model.path=/some/dir`" in result.stdout
    assert CALLS == []


def test_recipe_exit_code_and_bad_flag(automodel_plugin, cli):
    automodel_plugin(PLUGIN)
    assert cli("toyfail").exit_code == 3
    result = cli("toyrecipe", "--peft", "lorra")
    assert result.exit_code == 2
    assert "`peft.method` must be one of none, lora, dora, qlora; got 'lorra'. Did you mean `lora`?" in result.stderr
