"""YAML + dotted `key=value` overrides -> a typed, frozen RunConfig; and back to YAML.

Every mistake raises ConfigError with one line naming the key, the value and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from megamoe.config.tree import MoEConfig, RunConfig


class ConfigError(ValueError):
    """A user configuration mistake. The message is one line: key, value, fix."""


def load(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read a YAML file (None: start from defaults only), apply `a.b.c=value` overrides, type-check."""
    return from_dict(_read_yaml(Path(path)) if path is not None else {}, overrides)


def from_dict(data: dict[str, Any], overrides: typing.Sequence[str] = ()) -> RunConfig:
    """`load` of already-parsed YAML sections (not modified)."""
    data = copy.deepcopy(data)
    for item in overrides:
        _apply_override(data, item)
    return build(RunConfig, data)


def read_sections(path: str | Path) -> dict[str, Any]:
    """A config file's sections as parsed YAML (ConfigError if missing or malformed)."""
    return _read_yaml(Path(path))


def dump(cfg: RunConfig) -> str:
    """The resolved config as YAML; `load` of this text gives the same RunConfig."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a directory; pass a YAML file, e.g. configs/<name>.yaml")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass --config configs/<name>.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not a text file (not UTF-8); pass a YAML file, e.g. "
                          "configs/<name>.yaml") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file '{path}'{where} is not valid YAML: "
                          f"{getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections (model:, train:, ...), "
                          f"got a {type(data).__name__}")
    return data


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' is not of the form section.key=value, "
                          "e.g. train.train_iters=20")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text  # not YAML: keep the raw string; the type check decides
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{'.'.join(parents[:i + 1])}' is a value, not a section")
        node = child
    node[leaf] = value


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Construct dataclass `cls` from a mapping, recursively, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, "
                          f"got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if unknown := sorted(set(data) - set(fields)):
        raise ConfigError(_unknown_key_message(prefix, str(unknown[0]), sorted(fields)))
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                if dataclasses.is_dataclass(hints[name]):
                    kwargs[name] = build(hints[name], {}, key + ".")  # report the missing leaf
                    continue
                raise ConfigError(f"missing required config key '{key}' ({_type_name(hints[name])}); "
                                  f"add it to the YAML file or pass {key}=<value>")
            continue
        if dataclasses.is_dataclass(hints[name]):
            section = data[name] if data[name] is not None else {}
            kwargs[name] = build(_section_class(hints[name], section, key), section, key + ".")
        else:
            kwargs[name] = _coerce(data[name], hints[name], key)
    return cls(**kwargs)


def _section_class(cls: type, section: Any, key: str) -> type:
    """The dataclass that reads `section`: the moe: section's class depends on its variant."""
    if cls is not MoEConfig or not isinstance(section, dict):
        return cls
    from megamoe import variants  # the registry imports this module: import it on use

    variant = section.get("variant", MoEConfig.variant)
    if not isinstance(variant, str) or variant not in variants.VARIANTS:
        raise ConfigError(f"{key}.variant={variant!r} is unknown; choose one of {', '.join(sorted(variants.VARIANTS))}")
    return variants.VARIANTS[variant].config


def _unknown_key_message(prefix: str, key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    fix = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(known)}"
    return f"unknown config key '{prefix}{key}'; {fix}"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against type `tp`; convert where lossless (int -> float, number -> str in lists)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise _type_error(key, value, tp)
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise ConfigError(f"config key '{key}' must be one of {', '.join(map(repr, args))}; got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(key, value, tp)
        (elem,) = args
        if elem is str:  # Megatron-style weights in data_path are numbers in YAML
            value = [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in value]
        return [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(key, value, tp)
        return value
    if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:  # a str: YAML 1.1 reads 1e-3 (no dot) as a string
            number = float(value)
        except ValueError:
            raise _type_error(key, value, tp) from None
        if not math.isfinite(number):  # NaN passes every `x < 0` check and then poisons training
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
        return number
    if tp is int and isinstance(value, bool):
        raise _type_error(key, value, tp)
    if isinstance(value, tp):
        return value
    raise _type_error(key, value, tp)


def _type_error(key: str, value: Any, tp: Any) -> ConfigError:
    return ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r} "
                       f"({type(value).__name__}); e.g. {key}={_example(tp)}")


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    if origin is dict:
        return "a mapping"
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    return {int: "an int", float: "a number", bool: "true or false", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _example(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _example(next(a for a in args if a is not type(None)))
    if origin is list:
        return "[" + _example(args[0]) + "]"
    if origin is Literal:
        return str(args[0])
    return {int: "8", float: "0.1", bool: "true", str: "text"}.get(tp, "{}")
