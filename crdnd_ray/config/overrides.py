"""Dotted keys: ``--set`` parsing, applying overrides to a raw config tree, flattening, hashing."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml

from crdnd_ray.config.validation import ConfigError

__all__ = ["apply_overrides", "config_hash", "flatten", "parse_override", "split_key"]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested dict into dotted keys (lists are kept as values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def config_hash(tree: Any) -> str:
    """A short stable hash of any JSON-serialisable value (used to cache teachers)."""
    payload = json.dumps(tree, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:12]


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``dotted.key=value``; the value is read as YAML (``8/255``, lists and booleans work)."""
    if "=" not in text:
        raise ConfigError(
            f"The override '--set {text}' has no '='. Write it as --set dotted.key=value, "
            "for example --set train.epochs=5."
        )
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"The override '--set {text}' has an empty key. Write it as --set dotted.key=value.")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any], source: str = "overrides") -> None:
    """Set each dotted key of ``overrides`` in the nested ``raw`` dict, creating sections as needed.

    Inside free-form mappings (``student.kwargs``, ``search.space``, ...) the rest of the key is one
    entry, so ``--set search.space.method.temperature={type: uniform, low: 1, high: 4}`` works; inside
    ``ablation.variants.NAME`` (and ``ablation.tune.variant_space.NAME``) the rest is one dotted key.
    """
    for dotted, value in overrides.items():
        parts = split_key(dotted)
        node = raw
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(
                    f"Cannot set '{dotted}' from {source}: '{'.'.join(parts[: depth + 1])}' is a value, "
                    "not a section. Set the section's keys one by one instead."
                )
            node = node[part]
        node[parts[-1]] = value


_FREE_FORM_SECTIONS = ("student.kwargs", "teacher.kwargs", "scaling.resources_per_worker", "search.space",
                       "ablation.tune.space", "ablation.tune.overrides")
_NAMED_FREE_FORM_SECTIONS = ("ablation.variants", "ablation.tune.variant_space")


def split_key(dotted: str) -> list[str]:
    for prefix in _FREE_FORM_SECTIONS:
        if dotted.startswith(prefix + "."):
            return prefix.split(".") + [dotted[len(prefix) + 1 :]]
    for prefix in _NAMED_FREE_FORM_SECTIONS:
        if dotted.startswith(prefix + "."):
            name, _, rest = dotted[len(prefix) + 1 :].partition(".")
            return prefix.split(".") + [name] + ([rest] if rest else [])
    return dotted.split(".")


