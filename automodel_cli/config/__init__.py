"""Configuration: YAML layers, key=value overrides, validation and the resolved config."""

from automodel_cli.config.resolve import (
    ConfigError,
    Layer,
    ResolvedConfig,
    defaults_layer,
    layer_from_file,
    layer_from_overrides,
    resolve,
)
from automodel_cli.config.yaml_io import Source

__all__ = [
    "ConfigError", "Layer", "ResolvedConfig", "Source", "defaults_layer",
    "layer_from_file", "layer_from_overrides", "resolve",
]
