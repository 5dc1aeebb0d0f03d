"""Plugin settings: global options, environment variables, the settings file, and their order."""

from __future__ import annotations

import pytest

from automodel_cli.errors import UserError
from automodel_cli.plugin_settings import Layer, load_settings, settings_path, split_global_options

ENV = ("AUTOMODEL_BLOCK_PLUGINS", "AUTOMODEL_DISABLE_PLUGIN_AUTOLOAD", "AUTOMODEL_PLUGINS",
       "AUTOMODEL_PLUGINS_STRICT", "AUTOMODEL_CONFIG_DIR", "XDG_CONFIG_HOME")


@pytest.fixture
def settings_dir(tmp_path, monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AUTOMODEL_CONFIG_DIR", str(tmp_path))
    return tmp_path


def test_settings_file_location(monkeypatch, tmp_path):
    monkeypatch.delenv("AUTOMODEL_CONFIG_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert settings_path() == tmp_path / "xdg" / "automodel" / "settings.yaml"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert settings_path() == tmp_path / "home" / ".config" / "automodel" / "settings.yaml"
    monkeypatch.setenv("AUTOMODEL_CONFIG_DIR", str(tmp_path / "mine"))
    assert settings_path() == tmp_path / "mine" / "settings.yaml"


def test_no_settings_anywhere_loads_everything(settings_dir):
    settings = load_settings()
    assert settings.autoload and settings.enabled == set() and settings.blocked_by({"x"}) is None


def test_command_line_then_environment_then_file(settings_dir, monkeypatch):
    path = settings_dir / "settings.yaml"
    path.write_text("plugins:\n  block: [From-File, shared]\n  autoload: false\n  enable: [kept]\n")
    settings = load_settings()
    assert not settings.autoload and settings.enabled == {"kept"}
    assert settings.blocked_by({"from-file"}) == str(path)  # names compare as PEP 503 names
    monkeypatch.setenv("AUTOMODEL_DISABLE_PLUGIN_AUTOLOAD", "0")
    monkeypatch.setenv("AUTOMODEL_BLOCK_PLUGINS", "shared,from_env")
    monkeypatch.setenv("AUTOMODEL_PLUGINS", "also")
    settings = load_settings()
    assert settings.autoload  # the environment beats the file
    assert settings.enabled == {"kept", "also"}  # lists add up
    assert settings.blocked_by({"shared"}) == "AUTOMODEL_BLOCK_PLUGINS"  # the highest layer that blocks
    assert settings.blocked_by({"from-file"}) == str(path)
    layer, _ = split_global_options(["--no-plugins", "--block-plugin", "shared", "list", "losses"])
    settings = load_settings(layer)
    assert not settings.autoload  # the command line beats the environment
    assert settings.blocked_by({"shared"}) == "--block-plugin"


@pytest.mark.parametrize("text, message", [
    ("plugins:\n  blok: [x]\n", "unknown setting `plugins.blok`. Did you mean `block`?"),
    ("plugin:\n  block: [x]\n", "unknown setting `plugin`. Did you mean `plugins`?"),
    ("plugins:\n  autoload: sometimes\n", "`plugins.autoload` must be true or false, got 'sometimes'"),
    ("plugins:\n  block: {a: 1}\n", "`plugins.block` must be a list of plugin or distribution names"),
    ("plugins: [a]\n", "`plugins` must be a mapping"),
    ("plugins:\n  block: [a\n", "Cannot read the settings file"),
])
def test_bad_settings_file_names_file_and_key(settings_dir, text, message):
    (settings_dir / "settings.yaml").write_text(text)
    with pytest.raises(UserError) as info:
        load_settings()
    assert message in str(info.value) and str(settings_dir / "settings.yaml") in str(info.value)


@pytest.mark.parametrize("argv, blocked, autoload, rest", [
    (["finetune", "demo", "x=1"], None, None, ["finetune", "demo", "x=1"]),
    (["--block-plugin", "a", "--block-plugin=b", "list", "losses"], ("a", "b"), None, ["list", "losses"]),
    (["--no-plugins", "--help"], (), False, ["--help"]),
    (["--version"], None, None, ["--version"]),
    (["finetune", "demo", "--", "--block-plugin"], None, None, ["finetune", "demo", "--", "--block-plugin"]),
])
def test_global_options_come_off_the_front(argv, blocked, autoload, rest):
    layer, remaining = split_global_options(argv)
    assert remaining == rest
    if blocked is None:
        assert layer is None
    else:
        assert (layer.blocked, layer.autoload) == (blocked, autoload)


@pytest.mark.parametrize("argv, message", [
    (["--block-plugin"], "--block-plugin needs a plugin name"),
    (["--block-plugin", "--no-plugins", "list"], "--block-plugin needs a plugin name"),
    (["finetune", "demo", "--no-plugins"], "`--no-plugins` is a global option and goes before the command"),
])
def test_global_option_mistakes(argv, message):
    with pytest.raises(UserError, match=message):
        split_global_options(argv)


def test_command_line_layer_is_exported_to_child_processes(monkeypatch):
    monkeypatch.setenv("AUTOMODEL_BLOCK_PLUGINS", "old")
    layer = Layer("--block-plugin", autoload=False, blocked=("new",))
    assert layer.exported() == {"AUTOMODEL_BLOCK_PLUGINS": "old,new", "AUTOMODEL_DISABLE_PLUGIN_AUTOLOAD": "1"}
