"""Configuration: the schema (``Key``, ``option`` for plugins' option tables), YAML layers,
key=value overrides, validation and the resolved config."""

from automodel_cli.config.resolve import (
    ConfigError,
    Layer,
    ResolvedConfig,
    defaults_layer,
    layer_from_file,
    layer_from_overrides,
    resolve,
)
from automodel_cli.config.schema import Key, option
from automodel_cli.config.yaml_io import Source

__all__ = [
    "ConfigError", "Key", "Layer", "ResolvedConfig", "Source", "defaults_layer", "option",
    "layer_from_file", "layer_from_overrides", "resolve",
]
