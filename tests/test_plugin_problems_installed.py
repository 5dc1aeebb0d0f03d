"""Installed plugins that misbehave: a built-in name reused, two plugins sharing a name, a hook
argument misnamed, a loss that raises; and the ways to turn plugins off.

The example plugin and tests/fixtures/rival_plugin are pip-installed into a throwaway directory
that only the subprocesses of these tests put on their path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import run_cli
from plugin_packages import EXAMPLE, RIVAL, install_plugins

FAST = ["train.max_steps=1", "train.global_batch_size=4", "train.micro_batch_size=2",
        "train.eval_every_steps=null", "data.eval_split=null", "logging.progress=false"]
MISNAMED = "hook register_losses takes (registry), got (reg)"


@pytest.fixture(scope="module")
def rival_env(tmp_path_factory):
    env = install_plugins(tmp_path_factory.mktemp("site"), EXAMPLE, RIVAL)
    # no settings file unless a test writes one (not the user's ~/.config/automodel)
    return {**env, "AUTOMODEL_CONFIG_DIR": str(tmp_path_factory.mktemp("settings")),
            "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def plugins(*args: str, env: dict[str, str]) -> dict[str, dict]:
    result = run_cli(*args, "plugins", "list", "--all", "--json", env=env)
    assert result.exit_code == 0, result.stderr
    return {p["name"]: p for p in json.loads(result.stdout)}


def test_builtin_name_reused_keeps_the_builtin_warns_once_and_is_listed(rival_env):
    result = run_cli("list", "losses", "--json", env=rival_env)
    assert result.exit_code == 0, result.stderr
    masked_ce = next(row for row in json.loads(result.stdout) if row["name"] == "masked_ce")
    assert masked_ce["distribution"] == "automodel-cli"
    assert masked_ce["collisions"] == [{"plugin": "rival", "distribution": "automodel-rival-plugin",
                                        "version": "1.0.0", "effect": "ignored: collides with built-in"}]
    [warning] = [line for line in result.stderr.splitlines() if "masked_ce" in line]
    for fragment in ("[builtin-collision] rival: loss `masked_ce` is built in", "automodel-rival-plugin 1.0.0",
                     "override=True", "--block-plugin rival"):
        assert fragment in warning
    table = run_cli("list", "losses", env=rival_env).stdout.splitlines()
    ignored = [line for line in table if "masked_ce" in line and "automodel-rival-plugin" in line]
    assert len(ignored) == 1 and "ignored: collides with built-in" in ignored[0]
    doctor = run_cli("plugins", "doctor", env=rival_env)
    assert doctor.exit_code == 1 and "[builtin-collision] rival: loss `masked_ce`" in doctor.stdout


def test_misnamed_hook_argument_is_one_line(rival_env):
    result = run_cli("plugins", "list", "--json", env=rival_env)
    misnamed = {p["name"]: p for p in json.loads(result.stdout)}["misnamed"]
    assert (misnamed["status"], misnamed["errors"]) == ("error", [MISNAMED])
    assert f"automodel: warning: [load-error] misnamed: {MISNAMED} (see `automodel plugins doctor`)" \
        in result.stderr.splitlines()
    assert "0x" not in result.stderr and "Traceback" not in result.stderr
    assert f"[load-error] misnamed: {MISNAMED}" in run_cli("plugins", "doctor", env=rival_env).stdout


def test_block_plugin_and_no_plugins_options(rival_env):
    doctor = run_cli("--block-plugin", "automodel-rival-plugin", "plugins", "doctor", env=rival_env)
    assert doctor.exit_code == 0 and "No problems found." in doctor.stdout
    assert "rival (automodel-rival-plugin): blocked by --block-plugin" in doctor.stdout
    assert doctor.stderr == ""  # a blocked plugin is never loaded, so nothing to warn about
    listed = plugins("--block-plugin", "misnamed", env=rival_env)
    assert (listed["misnamed"]["status"], listed["misnamed"]["blocked_by"]) == ("blocked", "--block-plugin")
    assert listed["rival"]["status"] == "loaded"
    listed = plugins("--no-plugins", env=rival_env)
    assert {listed[name]["status"] for name in ("example", "rival", "misnamed")} == {"not-loaded"}
    assert listed["builtin-losses"]["status"] == "loaded"
    late = run_cli("plugins", "doctor", "--block-plugin", "rival", env=rival_env)
    assert late.exit_code == 2 and "goes before the command" in late.stderr


def test_settings_file_and_precedence(rival_env, tmp_path):
    settings = tmp_path / "settings.yaml"
    settings.write_text("plugins:\n  block: [misnamed]\n  autoload: false\n  enable: [rival]\n")
    env = {**rival_env, "AUTOMODEL_CONFIG_DIR": str(tmp_path)}
    listed = plugins(env=env)
    assert (listed["misnamed"]["status"], listed["misnamed"]["blocked_by"]) == ("blocked", str(settings))
    assert (listed["rival"]["status"], listed["example"]["status"]) == ("loaded", "not-loaded")
    env["AUTOMODEL_DISABLE_PLUGIN_AUTOLOAD"] = "0"  # the environment beats the file
    assert plugins(env=env)["example"]["status"] == "loaded"
    assert plugins("--no-plugins", env=env)["example"]["status"] == "not-loaded"  # the command line beats both
    env["AUTOMODEL_BLOCK_PLUGINS"] = "misnamed"
    assert plugins(env=env)["misnamed"]["blocked_by"] == "AUTOMODEL_BLOCK_PLUGINS"
    settings.write_text("plugins:\n  blok: [misnamed]\n")
    bad = run_cli("list", "losses", env=env)
    assert bad.exit_code == 2 and f"{settings}: unknown setting `plugins.blok`. Did you mean `block`?" in bad.stderr


def test_fixture_sees_only_the_plugin_under_test(rival_env, tmp_path):
    """A plugin author's tests, run by pytest where another plugin is installed that reuses the
    author's names: the fixture's host holds the built-ins and the author's plugin only."""
    (tmp_path / "test_example.py").write_text('''
import json

import automodel_plugin_example
import pytest

from automodel_cli.cli import main
from automodel_cli.errors import UserError


def test_only_the_plugin_under_test(automodel_plugin, capsys):
    registries = automodel_plugin(automodel_plugin_example)
    provider = registries.datasets.get("alpaca_jsonl").provider  # the rival's is not loaded
    assert (provider.plugin, provider.distribution, provider.version) == (
        "example", "automodel-plugin-example", "0.1.0")
    assert main(["list", "datasets"]) == 0
    out, err = capsys.readouterr()
    assert "automodel-plugin-example 0.1.0" in out and "rival" not in out + err
    assert main(["plugins", "list", "--json"]) == 0
    assert [p["name"] for p in json.loads(capsys.readouterr().out)] == ["example"]


def test_installed_plugins_on_request(automodel_plugin):
    registries = automodel_plugin(automodel_plugin_example, load_installed=True)
    assert "exploding_ce" in registries.losses
    with pytest.raises(UserError, match="registered by both"):
        registries.datasets.get("alpaca_jsonl")
''')
    template_tests = EXAMPLE / "tests" / "test_plugin.py"  # the template's own tests, as its docs show
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           str(tmp_path / "test_example.py"), str(template_tests)],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **rival_env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "4 passed" in proc.stdout


def crash_paragraph(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: the plugin `rival`")]


@pytest.mark.slow
def test_installed_plugin_exception_names_it(rival_env, tmp_path):
    result = run_cli("finetune", "demo", "-o", str(tmp_path / "run"), *FAST, "loss.name=exploding_ce", env=rival_env)
    assert result.exit_code == 1
    [paragraph] = crash_paragraph(result.stderr)
    assert ("(distribution automodel-rival-plugin 1.0.0) raised TypeError: exploding_loss cannot handle logits "
            "of shape") in paragraph
    site = rival_env["PYTHONPATH"].split(os.pathsep)[0]
    assert f"in exploding_loss ({site}/automodel_rival_plugin/losses.py:5). This is a bug in that plugin" in paragraph
    assert "Traceback" not in result.stderr and "Set AUTOMODEL_DEBUG=1 for the traceback." in paragraph
    debug = run_cli("finetune", "demo", "-o", str(tmp_path / "debug"), *FAST, "loss.name=exploding_ce",
                    env={**rival_env, "AUTOMODEL_DEBUG": "1"})
    assert debug.exit_code == 1 and "Traceback (most recent call last)" in debug.stderr
    assert len(crash_paragraph(debug.stderr)) == 1


@pytest.mark.slow
def test_plugin_exception_in_torchrun_ranks_names_it(rival_env, tmp_path):
    result = run_cli("finetune", "demo", "--nproc-per-node", "2", "-o", str(tmp_path / "run"), *FAST,
                     "loss.name=exploding_ce", env=rival_env)
    assert result.exit_code == 1, result.stderr[-3000:]
    paragraphs = crash_paragraph(result.stderr)
    assert 1 <= len(paragraphs) <= 2  # each rank that called the loss says so
    assert all("raised TypeError: exploding_loss cannot handle logits" in p for p in paragraphs)
    # the plugin warnings are shown once, by the launching process, not again by each rank
    assert len([line for line in result.stderr.splitlines() if "[builtin-collision] rival" in line]) == 1
