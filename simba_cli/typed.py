"""Typed settings from YAML or strings: a mapping checked against a dataclass, one-line errors naming the key.

    build(Recipe, yaml.safe_load(text), "recipe zoo-m.yaml")
    build(PruneConfig, {"final_keep": "0.1"}, "model_args", strings=True)   # lm-eval's key=value strings

Unknown keys, missing keys and wrongly typed values raise `UserError` with the key's full name
("recipe.yaml: optim.lr must be float, got 'fast'"), never a traceback.
"""

from __future__ import annotations

import dataclasses
import types
import typing

from simba_cli.errors import UserError


def yaml_problem(error) -> str:
    """A YAML parse error in one line, with where it is: 'expected ',' or '}', but got ':' (line 3, column 9)'."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def build(cls, raw, where: str, strings: bool = False):
    """An instance of dataclass `cls` from the mapping `raw`; `strings` also accepts '3' for 3, '0.1' for 0.1."""
    if not isinstance(raw, dict):
        raise UserError(f"{where} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; known keys are {', '.join(sorted(fields))}")
    kwargs = {name: convert(hints[name], value, f"{where}.{name}", strings) for name, value in raw.items()}
    missing = [n for n, f in fields.items() if n not in raw
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"{where}: missing key {missing[0]!r}")
    try:
        return cls(**kwargs)
    except UserError as e:  # the class's own checks: say where the values came from
        if str(e).startswith(where):
            raise
        raise UserError(f"{where}: {e}") from None


def convert(tp, value, where: str, strings: bool = False):
    """`value` as type `tp` (int, float, str, bool, Optional, tuple, list, a dataclass)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (strings and value in ("None", "null", "")):
            return None
        return convert(args[0], value, where, strings)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where, strings)
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if strings and isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[int, ...]: any length
            if not isinstance(value, (list, tuple)):
                raise UserError(f"{where} must be a list, got {value!r}")
            args = (args[0],) * len(value)
        if origin is tuple and (not isinstance(value, (list, tuple)) or len(value) != len(args)):
            raise UserError(f"{where} must be a list of {len(args)} values, got {value!r}")
        if origin is list:
            if not isinstance(value, (list, tuple)):
                raise UserError(f"{where} must be a list, got {value!r}")
            args = args * len(value)
        return origin(convert(a, v, f"{where}[{i}]", strings) for i, (a, v) in enumerate(zip(args, value)))
    if isinstance(value, bool) and tp is not bool:
        raise UserError(f"{where} must be {tp.__name__}, got {value!r}")
    if tp is float and isinstance(value, (int, float)):
        return float(value)
    if tp in (int, str, bool) and isinstance(value, tp):
        return value
    if isinstance(value, str) and (strings or tp is float):  # YAML reads 3e-3 (without a dot) as a string
        text = value.strip()
        try:
            if tp is bool and text.lower() in ("true", "false"):
                return text.lower() == "true"
            if tp in (int, float):
                return tp(text)
        except ValueError:
            pass
    name = getattr(tp, "__name__", str(tp))
    raise UserError(f"{where} must be {name}, got {value!r}")
