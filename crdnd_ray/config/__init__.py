"""The one config schema, its loading with ``--set`` overrides, and clear errors (see ``schema``)."""

from crdnd_ray.config.loading import load_config
from crdnd_ray.config.overrides import apply_overrides, config_hash, flatten, parse_override, split_key
from crdnd_ray.config.schema import *  # noqa: F403
from crdnd_ray.config.schema import __all__ as _schema_names
from crdnd_ray.config.validation import ConfigError, validate_model

__all__ = ["ConfigError", "apply_overrides", "config_hash", "flatten", "load_config", "parse_override",
           "split_key", "validate_model", *_schema_names]
