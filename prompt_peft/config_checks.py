"""Type and range checks for run settings from YAML files and ``--method_kwargs`` JSON, before any model loads.

argparse converts and checks command-line strings, but values that come from a YAML file (``parser.set_defaults``)
or from JSON reach the code unchecked: ``learning_rate: [0.1]`` failed deep inside the optimiser, ``seed: 1.7`` in
numpy, ``num_prompts: 100000000`` allocated until memory ran out. Each is now one :class:`ConfigError` line naming
the setting, the value and what is expected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

# Sizes far beyond any sensible run: a value above them is a typo (or a unit slip) that would allocate until the
# machine runs out of memory, so it is refused up front. Prompt tokens are appended to every image's ~200-1000
# patch tokens; a few thousand is already far more than any method uses.
SIZE_LIMITS = {
    "num_prompts": 4096,
    "num_class_prompts": 4096,
    "level_prompt_tokens": 4096,
    "shared_prompt_tokens": 4096,
    "attribute_prompt_tokens": 4096,
    "num_attribute_prompts": 4096,
    "num_prototypes": 1_000_000,
    "prompt_projection_dim": 65536,
    "embedding_dim": 65536,
    "num_classes": 10_000_000,
    "image_size": 4096,
    "batch_size": 65536,
    "eval_batch_size": 65536,
    "m_per_class": 65536,
    "num_workers": 1024,
    "gradient_accumulation_steps": 1_000_000,
}


class ConfigError(ValueError):
    """A setting has the wrong type or an impossible value; the message is one line naming it."""


def check_value(name: str, value: Any, annotation: Any, source: str = "") -> Any:
    """Return ``value`` if it fits the type ``annotation`` (int, float, str, bool, Optional / ``X | None`` of
    those), else raise :class:`ConfigError`. An int is accepted for a float (``1`` for ``1.0``), never the reverse."""
    where = f"{source}: " if source else ""
    expected = _allowed(annotation)
    if value is None and type(None) in expected:
        return value
    if isinstance(value, str) and float in expected and str not in expected:
        try:  # YAML 1.1 reads `1e-3` (no dot) as text
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool):
        ok = bool in expected
    elif isinstance(value, int):
        ok = int in expected or float in expected
    elif isinstance(value, float):
        ok = float in expected
    else:
        ok = any(isinstance(value, t) for t in expected if t is not type(None))
    if not ok:
        raise ConfigError(f"{where}{name} must be {_describe(expected)}, got {value!r} ({type(value).__name__})")
    check_size(name, value, source)
    return float(value) if float in expected and isinstance(value, int) and not isinstance(value, bool) else value


def check_size(name: str, value: Any, source: str = "") -> None:
    """Refuse a size far beyond any sensible run (see ``SIZE_LIMITS``)."""
    limit = SIZE_LIMITS.get(name)
    if limit is not None and isinstance(value, int) and not isinstance(value, bool) and value > limit:
        where = f"{source}: " if source else ""
        raise ConfigError(
            f"{where}{name}={value} is far beyond any sensible value (at most {limit}); it would allocate until memory "
            "runs out. Check for a typo."
        )


def _allowed(annotation: Any) -> set[type]:
    if isinstance(annotation, str):  # `from __future__ import annotations` in the module declaring the field
        annotation = eval(annotation, vars(typing))  # the annotation text of our own dataclasses
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return {t for arg in typing.get_args(annotation) for t in _allowed(arg)}
    if origin is not None:
        return {origin}
    return {annotation}


def _describe(expected: set[type]) -> str:
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        list: "a list",
        dict: "a mapping",
        type(None): "null",
    }
    return " or ".join(names.get(t, t.__name__) for t in sorted(expected, key=lambda t: t.__name__))


def _fields(dataclass_types) -> dict[str, dataclasses.Field]:
    return {f.name: f for cls in dataclass_types for f in dataclasses.fields(cls)}


def load_yaml_defaults(path: str | os.PathLike, dataclass_types) -> dict[str, Any]:
    """Read a YAML file of run settings for the given argument dataclasses and check every value.

    The top level must be a mapping of known settings; ``method_kwargs`` may be a mapping (returned as JSON text,
    the form ``--method_kwargs`` takes). Raises :class:`ConfigError` (one line) on any problem.
    """
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(f"--config {path}: cannot read it ({error.strerror or error})") from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(error, 'problem', error)}") from error
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of settings (e.g. 'learning_rate: 0.001'), got "
            f"{_describe({type(values)})}"
        )
    fields = _fields(dataclass_types)
    unknown = sorted(str(key) for key in values if key not in fields)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}")
    if isinstance(values.get("method_kwargs"), dict):
        values["method_kwargs"] = json.dumps(values["method_kwargs"])
    return {key: check_value(key, value, fields[key].type, source=str(path)) for key, value in values.items()}


def check_settings(settings) -> None:
    """Check the sizes of parsed argument dataclasses (command-line values are already typed by argparse)."""
    for instance in settings:
        for field in dataclasses.fields(instance):
            check_size(field.name, getattr(instance, field.name), source=f"--{field.name}")


def parse_method_kwargs(text: str, config_cls: type, method: str, **fixed: Any) -> dict[str, Any]:
    """``--method_kwargs`` JSON -> a checked dict of options of ``config_cls`` (the method's config dataclass).

    The options are also tried on ``config_cls(**fixed, **options)``, so the config's own checks (ranges, layer
    lists) report here too, before any model loads."""
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"--method_kwargs is not valid JSON ({error.msg} at character {error.pos}): {text!r}; "
            """write e.g. '{"num_prompts": 10, "deep": true}'"""
        ) from error
    if not isinstance(kwargs, dict):
        raise ConfigError(f"--method_kwargs must be a JSON object of {method} options, got {text!r}")
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ConfigError(f"--method_kwargs: {unknown} are not options of {method} ({config_cls.__name__})")
    hints = typing.get_type_hints(config_cls)
    options = {key: _check_option(key, value, hints[key]) for key, value in kwargs.items()}
    try:
        config_cls(**fixed, **options)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"--method {method} settings: {error}") from error
    return options


def _check_option(name: str, value: Any, annotation: Any) -> Any:
    if typing.get_origin(annotation) in (list, typing.Union, types.UnionType) and isinstance(value, list):
        check_size(name, len(value), source="--method_kwargs")
        return value  # lists (e.g. prompt_layers) are checked by the config itself
    allowed = _allowed(annotation)
    if not allowed <= {int, float, str, bool, type(None)}:  # structured options: the config validates them
        return value
    return check_value(name, value, annotation, source="--method_kwargs")


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean "the input is wrong" (their message says what to do), not "the code is wrong"."""
    from .data.datasets import DatasetCountError
    from .data.images import BadImagesError
    from .data.safe_paths import UnsafeImagePathError
    from .hub_checks import HubAccessError, HubUnreachableError
    from .strict_loading import AdapterMismatchError
    from .training.output_dir import OutputDirExistsError

    return (
        ConfigError,
        OutputDirExistsError,
        HubUnreachableError,
        HubAccessError,
        BadImagesError,
        UnsafeImagePathError,
        DatasetCountError,
        AdapterMismatchError,
    )


@contextlib.contextmanager
def exit_on_user_error(status: int = 2):
    """For scripts: a bad-input error ends the process with its message (``error: ...``) and no traceback."""
    errors = user_errors()
    try:
        yield
    except errors as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(status) from None
