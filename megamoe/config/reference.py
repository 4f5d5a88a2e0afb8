"""The configuration reference (markdown) generated from the config tree's field docstrings."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import types
import typing

from megamoe import variants
from megamoe.config.tree import MoEConfig, RunConfig


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass `cls`."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def _type(tp: typing.Any) -> str:
    """YAML-flavoured type names: int, float, bool, str, list[str], 'a' | 'b', int | null."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a) for a in args)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin is list:
        return f"list[{_type(args[0])}]"
    if origin is dict:
        return "mapping"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{json.dumps(f.default)}`"
    if f.default_factory is not dataclasses.MISSING and not dataclasses.is_dataclass(f.default_factory):
        return f"`{json.dumps(f.default_factory())}`"
    return "**required**"


def _table(section: str, cls: type, fields: list[dataclasses.Field]) -> list[str]:
    hints = typing.get_type_hints(cls)
    docs = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(field_docs(klass))
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    rows += [f"| `{section}.{f.name}` | {_type(hints[f.name])} | {_default(f)} | {docs.get(f.name, '')} |"
             for f in fields]
    return rows + [""]


def markdown() -> str:
    """One table per section (key, type, default, meaning); moe: adds one table per variant's own keys."""
    out = []
    for section in dataclasses.fields(RunConfig):
        cls = typing.get_type_hints(RunConfig)[section.name]
        out += [f"### `{section.name}:` — {' '.join((cls.__doc__ or '').split())}", ""]
        out += _table(section.name, cls, list(dataclasses.fields(cls)))
        if cls is MoEConfig:
            base = {f.name for f in dataclasses.fields(MoEConfig)}
            for variant, sub in ((name, v.config) for name, v in variants.VARIANTS.items()):
                out += [f"With `moe.variant: {variant}` — {' '.join((sub.__doc__ or '').split())}", ""]
                out += _table(section.name, sub, [f for f in dataclasses.fields(sub) if f.name not in base])
    return "\n".join(out)
