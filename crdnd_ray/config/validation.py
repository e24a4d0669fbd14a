"""Validation of a raw config mapping, with errors that name the file, the key, the line and the fix."""

from __future__ import annotations

import difflib
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

__all__ = ["ConfigError", "validate_model"]

Model = TypeVar("Model", bound=BaseModel)


class ConfigError(Exception):
    """A configuration problem, with a one-paragraph message meant for the user (no traceback)."""


def _yaml_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path of a YAML document to its 1-based line number."""
    lines: dict[tuple[str, ...], int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = str(key_node.value)
                lines[path + (key,)] = key_node.start_mark.line + 1
                walk(value_node, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for position, item in enumerate(node.value):
                lines[path + (str(position),)] = item.start_mark.line + 1
                walk(item, path + (str(position),))

    if root is not None:
        walk(root, ())
    return lines


def _suggest(root: type[BaseModel], key: str, location: tuple[Any, ...]) -> str:
    model: Any = root
    for part in location[:-1]:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return ""
        annotation = fields[part].annotation
        model = next(
            (arg for arg in (getattr(annotation, "__args__", None) or (annotation,)) if hasattr(arg, "model_fields")),
            None,
        )
        if model is None:
            return ""
    fields = getattr(model, "model_fields", {})
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
    if close:
        return f" Did you mean '{close[0]}'?"
    return f" Valid keys here are: {', '.join(fields)}." if fields else ""


def _override_source(location: tuple[str, ...], overridden: dict[tuple[str, ...], str]) -> str | None:
    """The ``--set`` override that set the value at ``location`` (or a section above or below it)."""
    for path, text in overridden.items():
        cut = min(len(path), len(location))
        if cut and path[:cut] == location[:cut]:
            return text
    return None


def _describe_errors(root: type[BaseModel], error: ValidationError, source: str, lines: dict[tuple[str, ...], int],
                     overridden: dict[tuple[str, ...], str] | None = None) -> str:
    problems = []
    for item in error.errors():
        location = tuple(str(part) for part in item["loc"] if not str(part).startswith("function-after"))
        location = tuple(part for part in location if part not in ("str", "list[str]", "float", "int"))
        dotted = ".".join(location) or "(top level)"
        override = _override_source(location, overridden or {})
        line = None
        for cut in range(len(location), 0, -1):
            line = lines.get(location[:cut])
            if line:
                break
        if override is not None:
            where = f"--set {override} (on top of {source})"
        else:
            where = f"{source}, line {line}" if line else source
        if item["type"] == "extra_forbidden":
            hint = _suggest(root, location[-1], location)
            problems.append(f"{where}: unknown key '{dotted}'.{hint}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            given = item.get("input")
            shown = "" if isinstance(given, dict) else f" (got {given!r})"
            problems.append(f"{where}: '{dotted}' is invalid: {message}{shown}.")
    return " ".join(problems) + " Fix the value in the file or with --set and run the command again."


def validate_model(model: type[Model], raw: dict[str, Any], source: str = "config", text: str = "",
                   overridden: dict[tuple[str, ...], str] | None = None) -> Model:
    """Validate a raw mapping into ``model``, turning every problem into one ConfigError paragraph.

    ``text`` is the YAML the mapping came from (for line numbers); ``overridden`` maps the key paths set by
    ``--set`` to the override's text, so a bad override is reported as that ``--set`` rather than as a line of
    the file.
    """
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe_errors(model, error, source, _yaml_lines(text), overridden)) from None
