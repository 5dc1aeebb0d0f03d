"""Reading and writing YAML with ruamel.yaml, keeping the line of every key for error messages.

ruamel.yaml is imported by the functions that parse or write YAML, not at import time: the
config package is imported by every plugin module that declares options, and
``automodel --help`` must not pay for the parser."""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automodel_cli.errors import UserError


@dataclass(frozen=True)
class Source:
    """Where a config value came from: a layer label, and a file and 1-based line if any."""

    layer: str
    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        if self.file and self.line:
            return f"{self.file}:{self.line}"
        return self.file or self.layer


def _plain(node: Any) -> Any:
    """Turn ruamel's round-trip containers into plain dicts and lists."""
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _collect_lines(node: Any, prefix: str, lines: dict[str, int]) -> None:
    from ruamel.yaml.comments import CommentedMap

    if not isinstance(node, CommentedMap):
        return
    for key, value in node.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        try:
            lines[dotted] = node.lc.key(key)[0] + 1
        except (KeyError, TypeError):
            pass
        _collect_lines(value, dotted, lines)


def load_yaml_file(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, int]]:
    """Load a YAML mapping; return (data, dotted key -> 1-based line)."""
    path = Path(path)
    if not path.exists():
        raise UserError(
            f"Config file `{path}` does not exist.",
            "Check the path (relative paths are resolved from the current directory).",
        )
    if path.is_dir():
        raise UserError(f"Config file `{path}` is a directory.", "Pass a .yaml file.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"Cannot read config file `{path}`: {exc}.") from None
    return load_yaml_text(text, str(path))


def load_yaml_text(text: str, name: str) -> tuple[dict[str, Any], dict[str, int]]:
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    yaml = YAML(typ="rt")
    try:
        document = yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        opened = exc.context_mark
        if exc.context and opened is not None and mark is not None and opened.line != mark.line:
            # an unclosed bracket or quote is found where the file ends: say where it began
            problem += f"; {exc.context} that starts at line {opened.line + 1}, column {opened.column + 1}"
        raise UserError(
            f"{name}{where}: this is not valid YAML ({problem}).",
            "Fix the syntax there (indentation, a missing ':' or an unclosed quote or bracket).",
        ) from None
    except YAMLError as exc:
        raise UserError(f"{name}: this is not valid YAML ({exc}).") from None
    if document is None:
        return {}, {}
    if not isinstance(document, CommentedMap):
        raise UserError(
            f"{name}: a config file must be a mapping of sections (model:, data:, train:, ...), "
            f"not a {type(document).__name__}."
        )
    lines: dict[str, int] = {}
    _collect_lines(document, "", lines)
    return _plain(document), lines


def parse_scalar(text: str) -> Any:
    """Type a command-line value the way YAML would: 3, 1e-4, true, null, [a, b], {k: v}."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    if text.strip() == "":
        return ""
    try:
        return YAML(typ="safe").load(text)
    except YAMLError:
        return text


def dump_yaml(data: dict[str, Any], comments: dict[str, str] | None = None) -> str:
    """Render a nested mapping as YAML, with optional end-of-line comments per dotted key."""
    from ruamel.yaml import YAML

    tree = _commented(data, "", comments or {})
    yaml = YAML(typ="rt")
    yaml.default_flow_style = False
    yaml.width = 4096
    buffer = io.StringIO()
    yaml.dump(tree, buffer)
    return buffer.getvalue()


def _commented(node: Any, prefix: str, comments: dict[str, str]) -> Any:
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(node, dict):
        mapping = CommentedMap()
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            mapping[key] = _commented(value, dotted, comments)
            if dotted in comments and not isinstance(value, dict):
                mapping.yaml_add_eol_comment(comments[dotted], key)
        return mapping
    if isinstance(node, list):
        seq = CommentedSeq(_commented(v, prefix, comments) for v in node)
        seq.fa.set_flow_style()
        return seq
    return node


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write a file so that readers see either the old or the new content, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
