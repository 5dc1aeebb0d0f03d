"""Layering and validation: defaults < recipe < model preset < -c files < key=value overrides.

Every layer is checked on its own so that each problem can name the file and line (or the
command-line override) that caused it; all problems are collected and reported together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from automodel_cli.config import schema
from automodel_cli.config.schema import SCHEMA, Key, NoneType
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


def layer_from_overrides(items: list[str]) -> Layer:
    """Parse ``key=value`` arguments into a layer (values typed like YAML scalars)."""
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
        spec = _spec_for(key)
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


def _spec_for(dotted: str) -> tuple[Key, bool] | None:
    """The Key governing ``dotted`` and whether ``dotted`` lies inside an open mapping."""
    key = schema.lookup(dotted)
    if key is not None:
        return key, False
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        parent = schema.lookup(".".join(parts[:cut]))
        if parent is not None and parent.open:
            return parent, True
    return None


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


def suggest_key(dotted: str) -> str | None:
    """The closest valid dotted key to a mistyped one."""
    if "." not in dotted:  # a mistyped section or top-level key
        sections = [name for name in SCHEMA]
        match = closest(dotted, sections)
        return match
    match = closest(dotted, schema.KEYS)
    if match:
        return match
    leaf = dotted.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in schema.KEYS}
    leaf_match = closest(leaf, by_leaf)
    return by_leaf[leaf_match] if leaf_match else None


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
    if key.choices and value not in key.choices:
        suggestion = closest(str(value), [str(c) for c in key.choices])
        hint = f" Did you mean `{suggestion}`?" if suggestion else ""
        choices = ", ".join(str(c) for c in key.choices)
        return f"`{dotted}` must be one of {choices}; got {shown or repr(value)}.{hint}"
    if (why := key.range_problem(value)) is not None:
        nullable = " (or null)" if NoneType in key.types else ""
        return f"`{dotted}` {why}{nullable}, got {shown or repr(value)}."
    return None


def check_layer(layer: Layer) -> list[Problem]:
    """Unknown keys and wrongly typed values of one layer."""
    problems: list[Problem] = []

    def unknown(dotted: str) -> None:
        suggestion = suggest_key(dotted)
        hint = f" Did you mean `{suggestion}`?" if suggestion else ""
        problems.append(Problem(layer.source(dotted), dotted, f"unknown key `{dotted}`.{hint}"))

    def check_value(dotted: str, value: Any, key: Key) -> None:
        if (problem := value_problem(dotted, value, key)) is not None:
            problems.append(Problem(layer.source(dotted), dotted, problem))

    for section, body in layer.data.items():
        spec = SCHEMA.get(section)
        if spec is None:
            unknown(section)
        elif isinstance(spec, Key):
            check_value(section, body, spec)
        elif not isinstance(body, dict):
            problems.append(Problem(layer.source(section), section,
                                    f"`{section}` must be a mapping of keys, got {_describe(body)}."))
        else:
            for name, value in body.items():
                dotted = f"{section}.{name}"
                key = spec.get(name)
                if key is None:
                    unknown(dotted)
                else:
                    check_value(dotted, value, key)
    return problems


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

    def __init__(self, tree: dict[str, Any], sources: dict[str, Source]):
        self.tree = tree  # not ``data``: that is the name of a config section
        self.sources = sources

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
    if isinstance(node, dict):
        return {k: REDACTED if is_secret_name(str(k)) and v not in (None, "") else _redact(v)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_redact(v) for v in node]
    return node


def resolve(layers: list[Layer]) -> ResolvedConfig:
    """Validate every layer, then merge them in order (later wins)."""
    problems = [problem for layer in layers for problem in check_layer(layer)]
    if problems:
        raise ConfigError(problems)
    data: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    for layer in layers:
        _merge(data, layer.data, layer, "", sources)
    return ResolvedConfig(data, sources)


def defaults_layer() -> Layer:
    return Layer(label="defaults", data=schema.defaults())
