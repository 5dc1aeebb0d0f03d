"""Name the plugin whose code raised an unexpected exception during a command.

A run calls plugin code (a dataset factory, a loss, a launcher) long after the plugin loaded.
When such code raises, the user needs to know whose bug it is and how to run without it, not a
traceback through automodel's internals. The innermost traceback frame whose module belongs to
a third-party plugin decides (``PluginHost.plugin_owning``); exceptions raised in no plugin's
code are automodel's own bugs and keep their traceback.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from types import FrameType

from automodel_cli.plugin_host import PluginHost, PluginRecord
from automodel_cli.plugin_settings import BLOCK_OPTION, ENV_BLOCK, env_flag

#: A plugin's bug is not a usage error (2): the command itself was fine.
PLUGIN_BUG_EXIT_CODE = 1
#: Set to 1 to print the traceback of a plugin's exception too.
ENV_DEBUG = "AUTOMODEL_DEBUG"


def debug_enabled() -> bool:
    return env_flag(ENV_DEBUG)


@dataclass(frozen=True)
class PluginCrash:
    """An exception raised in a plugin's code: the plugin and the frame that raised it."""

    plugin: PluginRecord
    exception: BaseException
    function: str
    filename: str
    line: int

    def message(self, *, debug: bool = False) -> str:
        record = self.plugin
        origin = (f"distribution {record.distribution} {record.version or ''}".strip()
                  if record.distribution else "registered in this process, not installed")
        problem = " ".join(str(self.exception).split())
        text = (
            f"the plugin `{record.name}` ({origin}) raised {type(self.exception).__name__}"
            f"{': ' + problem if problem else ''} in {self.function} ({self.filename}:{self.line}). "
            f"This is a bug in that plugin: report it to its authors, or run without it "
            f"({ENV_BLOCK}={record.name} or {BLOCK_OPTION} {record.name})."
        )
        return text if debug else f"{text} Set {ENV_DEBUG}=1 for the traceback."


def find_plugin_crash(exception: BaseException, host: PluginHost) -> PluginCrash | None:
    """The plugin whose code raised ``exception`` (or an exception it was raised ``from``)."""
    seen: set[int] = set()
    current: BaseException | None = exception
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        innermost: tuple[PluginRecord, FrameType, int] | None = None
        for frame, line in traceback.walk_tb(current.__traceback__):
            record = host.plugin_owning(str(frame.f_globals.get("__name__", "")))
            if record is not None:
                innermost = (record, frame, line)
        if innermost is not None:
            record, frame, line = innermost
            return PluginCrash(record, current, frame.f_code.co_name, frame.f_code.co_filename, line)
        current = current.__cause__
    return None


def format_traceback(exception: BaseException) -> str:
    return "".join(traceback.format_exception(type(exception), exception, exception.__traceback__))
