"""Loading a config: the YAML file, ``--set`` overrides on top, one validated :class:`RunConfig`.

``--set dotted.key=value`` overrides are applied to the raw YAML before validation, so they are checked
exactly like values written in the file, and an error names the override rather than a line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from crdnd_ray.config.overrides import apply_overrides, parse_override, split_key
from crdnd_ray.config.schema import RunConfig
from crdnd_ray.config.validation import ConfigError, validate_model

__all__ = ["load_config"]


def load_config(path: str | Path | None, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Load and validate a YAML config file (or the defaults when ``path`` is None), with overrides.

    Raises ConfigError with a message that names the file, the key path and the line.
    """
    text = ""
    source = "the built-in defaults"
    raw: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        source = str(file)
        if not file.is_file():
            raise ConfigError(
                f"The config file '{file}' does not exist. Check the path; the shipped examples live in "
                "search_spaces/ and ablations/."
            )
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(
                f"The config file '{file}' is not a text file (it is not UTF-8). Pass a YAML file such as "
                "search_spaces/digits.yaml."
            ) from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            line = f", line {mark.line + 1} column {mark.column + 1}" if mark else ""
            problem = getattr(error, "problem", None) or str(error)
            raise ConfigError(
                f"{file}{line}: this is not valid YAML ({problem}). Fix the syntax (indentation, colons, "
                "quotes) and run the command again."
            ) from None
        if loaded is None:
            raise ConfigError(
                f"The config file '{file}' is empty (nothing but blanks or comments). Fill it in (see "
                "search_spaces/digits.yaml), or leave the file out of the command to run on the built-in defaults."
            )
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{file}: the top level must be a mapping of sections (experiment, data, method, ...), "
                f"not a {type(loaded).__name__}."
            )
        raw = loaded
    overridden: dict[tuple[str, ...], str] = {}
    if overrides:
        if isinstance(overrides, list):
            pairs = {}
            for item in overrides:
                key, value = parse_override(item)
                pairs[key] = value
                overridden[tuple(split_key(key))] = item.strip()
        else:
            pairs = dict(overrides)
            overridden = {tuple(split_key(key)): f"{key}={value!r}" for key, value in pairs.items()}
        apply_overrides(raw, pairs, source=f"--set in {source}")
    return validate_model(RunConfig, raw, source=source, text=text, overridden=overridden)
