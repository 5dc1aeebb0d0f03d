"""Layering and validation: defaults < recipe < model preset < -c files < key=value overrides.

Every layer is checked on its own so that each problem can name the file and line (or the
command-line override) that caused it; all problems are collected and reported together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from automodel_cli.config import schema
from automodel_cli.config.schema import CORE_SCHEMA, Key, NoneType, Schema
from automodel_cli.config.secrets import REDACTED, is_secret_name
from automodel_cli.config.yaml_io import Source, dump_yaml, load_yaml_file, parse_scalar
from automodel_cli.errors import UserError, closest

COMMAND_LINE = "command line"


def redact_override(dotted: str, text: str) -> str:
    """A ``key=value`` argument as it may be printed: a secret key's value is replaced."""
    if not is_secret_name(dotted):
        return text
    name, sep, _ = text.partition("=")
    return f"{name}{sep}{REDACTED}" if sep else text


@dataclass
class Layer:
    """One source of config values."""

    label: str
    data: dict[str, Any]
    file: str | None = None
    lines: dict[str, int] = field(default_factory=dict)
    #: dotted key -> the ``key=value`` text it came from (command-line layer only).
    overrides: dict[str, str] = field(default_factory=dict)

    def source(self, dotted: str) -> Source:
        if dotted in self.overrides:
            return Source(f"{COMMAND_LINE} `{redact_override(dotted, self.overrides[dotted])}`")
        line = self.lines.get(dotted)
        if line is None:  # a value inside an open mapping: point at its parent key
            parent = dotted
            while "." in parent and line is None:
                parent = parent.rsplit(".", 1)[0]
                line = self.lines.get(parent)
        return Source(self.label, self.file, line)


def layer_from_file(path: str) -> Layer:
    data, lines = load_yaml_file(path)
    return Layer(label=path, data=data, file=path, lines=lines)


def layer_from_overrides(items: list[str], schema_: Schema = CORE_SCHEMA) -> Layer:
    """Parse ``key=value`` arguments into a layer (values typed like YAML scalars; a string key
    keeps the text as written)."""
    data: dict[str, Any] = {}
    texts: dict[str, str] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(
                f"Cannot read the argument `{item}`: overrides are written key=value "
                f"(for example train.max_steps=100).",
                "Options start with -- (see --help).",
            )
        value = parse_scalar(raw)
        spec = schema_.spec_for(key)
        if spec is not None and str in spec[0].types and value is not None and not isinstance(value, spec[0].types):
            value = raw  # a string key given something YAML reads as a number or bool
        _set_override(data, key, value)
        texts[key] = item
    return Layer(label=COMMAND_LINE, data=data, overrides=texts)


def _set_override(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


# ------------------------------------------------------------------------------- checking
@dataclass
class Problem:
    source: Source
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.message}"


class ConfigError(UserError):
    """All problems found in a configuration, each with its file and line or override."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        count = len(problems)
        lines = "\n".join(f"  - {p}" for p in problems)
        head = "The configuration has a problem:" if count == 1 else f"The configuration has {count} problems:"
        super().__init__(f"{head}\n{lines}\n", "`automodel config show` prints every valid key with its default.")


def _type_ok(value: Any, key: Key) -> bool:
    if isinstance(value, bool):
        return bool in key.types
    if isinstance(value, int) and float in key.types:
        return True
    return isinstance(value, tuple(t for t in key.types if t is not NoneType)) or (
        value is None and NoneType in key.types
    )


def _describe(value: Any) -> str:
    kind = {bool: "true/false", int: "integer", float: "number", str: "string",
            list: "list", dict: "mapping", NoneType: "null"}.get(type(value), type(value).__name__)
    return f"{value!r} ({kind})"


def value_problem(dotted: str, value: Any, key: Key) -> str | None:
    """What is wrong with ``value`` for ``key`` (type, choice or range), or None. Secret values
    are never repeated in the message."""
    shown = REDACTED if is_secret_name(dotted) else None
    if not _type_ok(value, key):
        return f"`{dotted}` must be {key.type_name()}, got {shown or _describe(value)}."
    if key.choices and value not in key.choices and not (value is None and NoneType in key.types):
        suggestion = closest(str(value), [str(c) for c in key.choices])
        hint = f" Did you mean `{suggestion}`?" if suggestion else ""
        choices = ", ".join(str(c) for c in key.choices)
        return f"`{dotted}` must be one of {choices}; got {shown or repr(value)}.{hint}"
    if (why := key.range_problem(value)) is not None:
        return f"`{dotted}` {why}, got {shown or repr(value)}."
    return None


def check_layer(layer: Layer, schema_: Schema = CORE_SCHEMA) -> list[Problem]:
    """Unknown keys and wrongly typed or out-of-range values of one layer."""
    problems: list[Problem] = []

    def unknown(dotted: str) -> None:
        problems.append(Problem(layer.source(dotted), dotted, unknown_key_message(dotted, schema_)))

    def walk(node: dict[str, Any], spec: dict[str, Any], prefix: str) -> None:
        for name, value in node.items():
            dotted = f"{prefix}.{name}" if prefix else str(name)
            key = spec.get(name)
            if key is None:
                if dotted.split(".", 1)[0] not in schema_.lenient:
                    unknown(dotted)
            elif isinstance(key, Key):
                if (problem := value_problem(dotted, value, key)) is not None:
                    problems.append(Problem(layer.source(dotted), dotted, problem))
            elif not isinstance(value, dict):
                problems.append(Problem(layer.source(dotted), dotted,
                                        f"`{dotted}` must be a mapping of keys, got {_describe(value)}."))
            else:
                walk(value, key, dotted)

    walk(layer.data, schema_.tree, "")
    return problems


def unknown_key_message(dotted: str, schema_: Schema) -> str:
    """``unknown key `x`.`` with the closest valid key, or why a known key does not apply here
    (a section another recipe reads, or a core section this recipe does not read)."""
    section = dotted.split(".", 1)[0]
    if section not in schema_.tree:
        if (owner := schema_.foreign_sections.get(section)) is not None:
            return f"`{section}` is read by the `{owner}` recipe only, so `{dotted}` has no effect here."
        if section in schema.CORE:
            return f"this recipe does not read the `{section}` section, so `{dotted}` would have no effect."
    suggestion = schema_.suggest(dotted)
    hint = f" Did you mean `{suggestion}`?" if suggestion else ""
    table = schema_.table_of(dotted)
    if table is not None and dotted != table.path:
        names = ", ".join(schema_.node(table.path) or {})
        return f"unknown option `{dotted}` of the {table.kind} `{table.name}`.{hint} Its options: {names}."
    return f"unknown key `{dotted}`.{hint}"


# -------------------------------------------------------------------------------- merging
def _merge(base: dict[str, Any], update: dict[str, Any], layer: Layer, prefix: str,
           sources: dict[str, Source]) -> None:
    for name, value in update.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if isinstance(value, dict) and isinstance(base.get(name), dict):
            _merge(base[name], value, layer, dotted, sources)
        else:
            base[name] = value
            for stale in [k for k in sources if k.startswith(dotted + ".")]:
                del sources[stale]
            _record_sources(value, layer, dotted, sources)


def _record_sources(value: Any, layer: Layer, dotted: str, sources: dict[str, Source]) -> None:
    if isinstance(value, dict) and value:
        for name, child in value.items():
            _record_sources(child, layer, f"{dotted}.{name}", sources)
    else:
        sources[dotted] = layer.source(dotted)


class ResolvedConfig:
    """The merged configuration plus the source of every value.

    Read it as ``cfg.train.max_steps`` or ``cfg.get("train.max_steps")``.
    """

    def __init__(self, tree: dict[str, Any], sources: dict[str, Source], schema_: Schema = CORE_SCHEMA):
        self.tree = tree  # not ``data``: that is the name of a config section
        self.sources = sources
        self.schema = schema_

    def get(self, dotted: str, default: Any = None) -> Any:
        return schema.get_dotted(self.tree, dotted, default)

    def __getattr__(self, name: str) -> Any:
        tree = self.__dict__.get("tree", {})
        if name in tree:
            return _view(tree[name])
        raise AttributeError(name)

    def source_of(self, dotted: str) -> Source | None:
        return self.sources.get(dotted)

    def redacted(self) -> dict[str, Any]:
        """A copy safe to print or save: values of secret-looking keys are replaced."""
        return _redact(self.tree)

    def to_yaml(self, with_sources: bool = False) -> str:
        comments = {k: f"from {s}" for k, s in self.sources.items()} if with_sources else None
        return dump_yaml(self.redacted(), comments)


class _Section:
    """Attribute access to one config section (read-only)."""

    def __init__(self, data: dict[str, Any]):
        self.__dict__["_data"] = data

    def __getattr__(self, name: str) -> Any:
        try:
            return _view(self._data[name])
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("the resolved config is read-only")

    def to_dict(self) -> dict[str, Any]:
        return dict(self._data)


def _view(value: Any) -> Any:
    return _Section(value) if isinstance(value, dict) else value


def _redact(node: Any) -> Any:
    """Secret-named scalars become ``<redacted>``; mappings and lists keep their shape (a
    mapping under a secret-looking key, e.g. references to Kubernetes secrets, is walked)."""
    if isinstance(node, dict):
        return {k: REDACTED if is_secret_name(str(k)) and v not in (None, "") and not isinstance(v, (dict, list))
                else _redact(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_redact(v) for v in node]
    return node


def resolve(layers: list[Layer], schema_: Schema = CORE_SCHEMA) -> ResolvedConfig:
    """Validate every layer against ``schema_``, then merge them in order (later wins)."""
    problems = [problem for layer in layers for problem in check_layer(layer, schema_)]
    if problems:
        raise ConfigError(problems)
    data: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    for layer in layers:
        _merge(data, layer.data, layer, "", sources)
    return ResolvedConfig(data, sources, schema_)


def defaults_layer(schema_: Schema = CORE_SCHEMA) -> Layer:
    return Layer(label="defaults", data=schema_.defaults())
