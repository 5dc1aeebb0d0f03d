"""An exception raised in a plugin's code during a run names the plugin; ours keep a traceback.

The plugins here are registered with the ``automodel_plugin`` fixture and run by the real
``finetune`` recipe in this process (one optimizer step on the bundled demo model).
"""

from __future__ import annotations

import pytest

from automodel_cli import hookimpl
from automodel_cli.plugin_errors import find_plugin_crash

FAST = ["train.max_steps=1", "train.global_batch_size=4", "train.micro_batch_size=4",
        "train.eval_every_steps=null", "data.eval_split=null", "logging.progress=false"]


def exploding_loss(logits, labels, num_label_tokens=None):
    raise TypeError("exploding_loss cannot handle these logits")


RAISE_LINE = exploding_loss.__code__.co_firstlineno + 1


class Exploder:
    """Registers a loss that raises, and reuses the built-in name ``masked_ce``."""

    @hookimpl
    def register_losses(self, registry):
        registry.add("exploding_ce", exploding_loss)
        registry.add("masked_ce", exploding_loss)  # ignored: the built-in stays in charge
        # a plugin entry that is our code: its bugs are ours, not the plugin's
        registry.add("not_a_loss", "automodel_cli.errors:closest")


def finetune(cli, tmp_path, *args):
    return cli("finetune", "demo", "-o", str(tmp_path / "run"), *FAST, *args)


@pytest.fixture
def exploder(automodel_plugin):
    automodel_plugin(Exploder(), name="exploder", distribution="exploder-dist", version="0.3")
    return automodel_plugin.host


def test_plugin_exception_names_plugin_distribution_and_place(exploder, cli, tmp_path, monkeypatch):
    monkeypatch.delenv("AUTOMODEL_DEBUG", raising=False)
    result = finetune(cli, tmp_path, "loss.name=exploding_ce")
    assert result.exit_code == 1
    assert (f"error: the plugin `exploder` (distribution exploder-dist 0.3) raised TypeError: exploding_loss "
            f"cannot handle these logits in exploding_loss ({__file__}:{RAISE_LINE}). This is a bug in that "
            f"plugin: report it to its authors, or run without it (AUTOMODEL_BLOCK_PLUGINS=exploder or "
            f"--block-plugin exploder). Set AUTOMODEL_DEBUG=1 for the traceback.") in result.stderr
    assert "Traceback" not in result.stderr


def test_debug_adds_the_traceback(exploder, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOMODEL_DEBUG", "1")
    result = finetune(cli, tmp_path, "loss.name=exploding_ce")
    assert result.exit_code == 1
    traceback_part, _, paragraph = result.stderr.partition("error: the plugin `exploder`")
    assert "Traceback (most recent call last)" in traceback_part
    assert f'File "{__file__}", line {RAISE_LINE}, in exploding_loss' in traceback_part
    assert paragraph and "AUTOMODEL_DEBUG" not in paragraph


def test_builtin_name_reused_keeps_builtin_and_the_run_works(exploder, cli, tmp_path):
    result = finetune(cli, tmp_path)  # loss.name defaults to masked_ce: the built-in one runs
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "masked_ce" in line]
    assert len(warnings) == 1 and "[builtin-collision] exploder" in warnings[0]
    assert (tmp_path / "run" / "final").is_dir()


def test_our_own_bugs_keep_their_traceback(exploder, cli, tmp_path):
    with pytest.raises(TypeError):  # raised in automodel code calling closest() wrongly
        finetune(cli, tmp_path, "loss.name=not_a_loss")


#: Helpers compiled as the module ``elsewhere``, which no plugin owns (like automodel's own code).
ELSEWHERE: dict = {"__name__": "elsewhere"}
exec(compile("""
def caught(function, *args):
    try:
        function(*args)
    except Exception as error:
        return error

def fails():
    raise ValueError("ours")

def wraps(function, *args):
    try:
        function(*args)
    except TypeError as error:
        raise RuntimeError("wrapped") from error
""", "<elsewhere>", "exec"), ELSEWHERE)


def test_only_frames_of_plugin_code_count(exploder):
    caught = ELSEWHERE["caught"]
    crash = find_plugin_crash(caught(exploding_loss, None, None), exploder)
    assert (crash.plugin.name, crash.function, crash.line) == ("exploder", "exploding_loss", RAISE_LINE)
    assert find_plugin_crash(caught(ELSEWHERE["fails"]), exploder) is None
    wrapped = caught(ELSEWHERE["wraps"], exploding_loss, None, None)
    assert type(wrapped) is RuntimeError
    assert type(find_plugin_crash(wrapped, exploder).exception) is TypeError  # through `raise ... from`
