"""The top-level CLI: help, version, listings, startup cost."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import run_cli

BUILTIN_COMMANDS = ["plugins", "list", "config"]


def test_help_lists_commands_with_descriptions():
    result = run_cli("--help")
    assert result.exit_code == 0, result.stderr
    for command in BUILTIN_COMMANDS:
        assert command in result.stdout
    assert "Inspect installed plugins." in result.stdout


def test_no_arguments_shows_help_not_traceback():
    result = run_cli()
    assert "Usage" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_version():
    result = run_cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == "automodel-cli 0.1.0"


HEAVY_MODULES = ("torch", "transformers", "datasets", "peft")


def imported_after(argvs: list[list[str]], modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has imported after running the CLI with each argv."""
    code = (
        "import json, sys\n"
        "from automodel_cli.cli import main\n"
        f"for argv in {argvs!r}:\n"
        "    main(argv)\n"
        f"print(json.dumps(sorted(m for m in {modules!r} if m in sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_help_and_plugins_list_do_not_import_torch():
    argvs = [["--help"], ["plugins", "list", "--all"], ["list", "models"]]
    assert imported_after(argvs, HEAVY_MODULES) == []


def test_help_imports_neither_rich_nor_the_config_parser():
    """`--help` is formatted by click, and config parsing waits for a command that reads config."""
    assert imported_after([["--help"]], ("rich", "ruamel.yaml", *HEAVY_MODULES)) == []


def test_help_shows_whole_command_summaries():
    """Plain click help would cut each summary at the terminal width with "..."."""
    result = run_cli("--help", env={"COLUMNS": "80"})
    listing = result.stdout.partition("Commands:")[2]
    assert listing and "..." not in listing
    summary = " ".join(listing.split())
    assert "Measure training throughput: tokens/s, step time, TFLOP/s, MFU and peak memory per device." in summary


def test_plugins_list_hides_builtins_unless_all():
    shown = json.loads(run_cli("plugins", "list", "--json").stdout)
    assert all(not p["builtin"] for p in shown)
    everything = json.loads(run_cli("plugins", "list", "--all", "--json").stdout)
    models = next(p for p in everything if p["name"] == "builtin-models")
    assert models["builtin"] and models["status"] == "loaded"
    assert models["distribution"] == "automodel-cli"
    assert models["hooks"] == ["register_models"]


def test_list_models_names_provider():
    rows = json.loads(run_cli("list", "models", "--json").stdout)
    llama = next(r for r in rows if r["name"] == "llama3")
    assert llama["path"] == "meta-llama/Llama-3.2-1B-Instruct"
    assert llama["family"] == "llama"
    assert (llama["distribution"], llama["version"]) == ("automodel-cli", "0.1.0")
    families = {r["family"] for r in rows}
    assert {"llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3"} <= families


def test_list_table_output():
    result = run_cli("list", "losses")
    assert result.exit_code == 0
    assert "masked_ce" in result.stdout and "automodel-cli 0.1.0" in result.stdout


def test_unknown_list_kind_is_usage_error():
    result = run_cli("list", "modles")
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr
