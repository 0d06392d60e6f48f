"""Options declared once: a dataclass field carries its flag, help, choices, bounds and whether it
changes results; argparse flags, validation, the recorded options and the result key derive from it.

    @dataclass
    class MyOptions(Options):
        top_fraction: float = option(0.005, "top fraction above the threshold", flag="--quantile",
                                     low=0.0, high=1.0, open_bounds=True, results=True)

`add_flags(parser, MyOptions)` then adds `--quantile` (type float, finite, help with the
default), `MyOptions.from_args(args)` builds a validated instance, `MyOptions.result_fields()`
lists what keys caches and recorded results. Used by `dissect run` (dissect.config) and
`cgl-train` (cgl_train.config).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from broden.errors import InputError

__all__ = ["Opt", "option", "Options", "add_flags", "finite_float", "json_object", "comma_list",
           "option_error"]

_NO_DEFAULT = object()


@dataclass(frozen=True)
class Opt:
    """How one option looks to users; stored in the dataclass field's metadata."""

    help: str
    flag: str | None = ""                 # "" -> --field-name; None -> no flag (config file / API only)
    aliases: tuple[str, ...] = ()         # more spellings of the flag
    choices: tuple[Any, ...] | None = None  # valid values (None allowed when the default is None)
    low: float | None = None              # bounds of a number (inclusive unless open_bounds)
    high: float | None = None
    open_bounds: bool = False             # bounds exclude low and high
    results: bool = False                 # the value can change a number in the outputs
    group: str | None = None              # argparse group title in --help
    metavar: str | None = None
    expected: str | None = None           # what a valid value looks like, for errors (default: derived)
    parse: Callable[[str], dict[str, Any]] | None = None  # flag text -> field values (composite flags)
    example: str | None = None            # an example value shown in errors of JSON-object flags
    show_default: bool = True             # append "(default X)" to the help
    append: bool = False                  # a list option given by repeating the flag (--mirror A --mirror B)
    const: Any = None                     # the flag takes no value and sets the option to this one


def option(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field declaring an option (`default` may be a list or dict: copied per instance)."""
    meta = {"option": Opt(help=help, **kw)}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def finite_float(text: str) -> float:
    """argparse type: a finite float (nan and inf are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def json_object(example: str | None = None) -> Callable[[str], dict[str, Any]]:
    """argparse type factory: a JSON object, with errors that show `example`."""
    hint = f", e.g. '{example}'" if example else ""

    def parse(text: str) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({e.msg}); expected a JSON "
                                             f"object{hint}") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"{text!r} is a JSON {type(value).__name__}; expected a JSON "
                                             f"object{hint}")
        return value
    return parse


def comma_list(values: Iterable[str] | str | None) -> list[str] | None:
    """Flatten 'a,b c' style values (space- and comma-separated, mixed) into ['a', 'b', 'c']."""
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    return [part.strip() for v in values for part in str(v).split(",") if part.strip()]


# ---------------------------------------------------------------- introspection

def _base_type(hint: Any) -> tuple[Any, bool]:
    """(type without None, whether None is allowed) of a resolved annotation."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return hint, False


@dataclass(frozen=True)
class _Declared:
    name: str
    opt: Opt
    kind: Any        # int, float, str, bool, list, dict
    optional: bool   # None is a valid value
    default: Any

    @property
    def flag(self) -> str | None:
        if self.opt.flag is None:
            return None
        if self.opt.flag:
            return self.opt.flag
        if self.kind is bool and self.default is True:
            return "--no-" + self.name.replace("_", "-")
        return "--" + self.name.replace("_", "-")

    def shown(self) -> str:
        """The name a user typed: the flag when there is one, else the field."""
        return self.flag or self.name


def _declared(cls: type) -> list[_Declared]:
    cached = cls.__dict__.get("_declared_cache")
    if cached is not None:
        return cached
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        opt = f.metadata.get("option")
        if opt is None:
            raise TypeError(f"{cls.__name__}.{f.name}: declare it with dissect.options.option(...)")
        kind, optional = _base_type(hints[f.name])
        kind = typing.get_origin(kind) or kind
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append(_Declared(f.name, opt, kind, optional, default))
    setattr(cls, "_declared_cache", out)
    return out


def option_error(source: str | None, shown: str, value: Any, name: str, expected: str) -> InputError:
    """The one shape of a bad-option message: names what the user typed, the field, and what is valid."""
    where = f"{source}: " if source else ""
    return InputError(f"{where}{shown} {value!r} (option {name}): expected {expected}")


def _expected(d: _Declared) -> str:
    if d.opt.expected:
        return d.opt.expected
    if d.opt.choices is not None:
        text = "one of " + ", ".join(str(c) for c in d.opt.choices)
    elif d.kind is bool:
        text = "true or false"
    elif d.kind in (int, float):
        noun = "an integer" if d.kind is int else "a finite number"
        lo, hi, op = d.opt.low, d.opt.high, d.opt.open_bounds
        if lo is not None and hi is not None:
            text = f"{noun} in {'(' if op else '['}{lo:g}, {hi:g}{')' if op else ']'}"
        elif lo is not None:
            words = {(0, int, False): "a non-negative integer", (1, int, False): "a positive integer",
                     (0, float, False): "a non-negative number", (0, float, True): "a positive number"}
            text = words.get((lo, d.kind, op), f"{noun} {'>' if op else '>='} {lo:g}")
        else:
            text = noun
    elif d.kind is list:
        text = "a list of names"
    elif d.kind is dict:
        text = "a JSON object"
    else:
        text = "a string"
    return text + (" or null" if d.optional and d.default is None and d.opt.choices is None else "")


def _valid(d: _Declared, value: Any) -> bool:
    if value is None:
        return d.optional
    if d.opt.choices is not None:
        return value in d.opt.choices
    if d.kind is bool:
        return isinstance(value, bool)
    if d.kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if d.kind is int and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        lo, hi, op = d.opt.low, d.opt.high, d.opt.open_bounds
        if lo is not None and (value <= lo if op else value < lo):
            return False
        return not (hi is not None and (value >= hi if op else value > hi))
    if d.kind is list:
        return isinstance(value, list) and all(isinstance(v, str) and v for v in value)
    if d.kind is dict:
        return isinstance(value, dict)
    if d.kind is str:
        return isinstance(value, str)
    return True


class Options:
    """Base of option dataclasses: validation, dicts, flags and the result fields, all from the fields."""

    def validate(self, source: str | None = None) -> "Options":
        """Raise InputError naming the first option with a bad value (flag, field, what is valid); return self."""
        for d in _declared(type(self)):
            value = getattr(self, d.name)
            if d.kind is int and isinstance(value, float) and value.is_integer() and not isinstance(value, bool):
                value = int(value)  # JSON writes 3.0 for some ints
                setattr(self, d.name, value)
            elif d.kind is list and (isinstance(value, (str, tuple)) or (
                    isinstance(value, list) and all(isinstance(v, str) for v in value))):
                # 'a,b', ('a', 'b') or ['a,b', 'c'] from the API, or flags passed on unsplit
                # (`dissect run` hands argparse's lists straight to dissect.run)
                value = comma_list(value)
                setattr(self, d.name, value)
            elif d.kind is str and isinstance(value, os.PathLike):
                value = os.fspath(value)  # paths given as Path objects are recorded as strings
                setattr(self, d.name, value)
            if not _valid(d, value):
                raise option_error(source, d.shown(), value, d.name, _expected(d))
        self._check(source)
        return self

    def _check(self, source: str | None) -> None:
        """Rules across options (subclasses); raise option_error(...)."""

    def bad(self, source: str | None, name: str, expected: str) -> InputError:
        """An InputError about option `name` in the one shape (for `_check` rules)."""
        d = next(x for x in _declared(type(self)) if x.name == name)
        return option_error(source, d.shown(), getattr(self, name), name, expected)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every option."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def replace(self, **changes: Any) -> Any:
        """A validated copy with some options changed."""
        return dataclasses.replace(self, **changes).validate()  # type: ignore[type-var]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str | None = None) -> Any:
        """Build from a dict (any subset of the options); unknown keys are an InputError naming them."""
        where = f"{source}: " if source else ""
        if not isinstance(values, Mapping):
            raise InputError(f"{where}expected a JSON object of options, got {type(values).__name__}")
        names = [d.name for d in _declared(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise InputError(f"{where}unknown option(s) {unknown}; valid options: {', '.join(sorted(names))}")
        return cls(**dict(values)).validate(source)

    @classmethod
    def option_names(cls) -> list[str]:
        """Every option's field name, in declaration order."""
        return [d.name for d in _declared(cls)]

    @classmethod
    def result_fields(cls) -> frozenset[str]:
        """Options whose value can change a number in the outputs (they key caches and resumed states)."""
        return frozenset(d.name for d in _declared(cls) if d.opt.results)

    @classmethod
    def flags(cls) -> dict[str, str]:
        """Field name -> the flag that sets it (options without a flag are left out)."""
        return {d.name: d.flag for d in _declared(cls) if d.flag}

    @classmethod
    def from_args(cls, args: argparse.Namespace, base: Mapping[str, Any] | None = None,
                  source: str | None = None) -> Any:
        """Options from parsed flags over `base` (default: the defaults); validated.

        Flags added with `add_flags(..., suppress=True)` are absent unless given, so only
        those given override `base`. A composite flag (Opt.parse) may set several fields;
        dict values it sets are merged into the base's.
        """
        values = dict(base) if base is not None else {}
        given = vars(args)
        for d in _declared(cls):
            if d.name not in given:
                continue
            value = given[d.name]
            if d.opt.parse is not None and isinstance(value, str):
                for key, v in d.opt.parse(value).items():
                    values[key] = {**values.get(key, {}), **v} if isinstance(v, dict) else v
            elif d.kind is list and value is not None:
                values[d.name] = comma_list(value)
            else:
                values[d.name] = value
        return cls.from_dict(values, source)


def add_flags(parser: argparse.ArgumentParser, cls: type, suppress: bool = False,
              groups: Mapping[str, str] | None = None, skip: Iterable[str] = (),
              containers: Mapping[str, Any] | None = None) -> None:
    """Add a flag for every option of `cls` that has one.

    suppress=True leaves a flag out of the namespace unless given (for defaults that come
    from a config file); else the namespace holds every option, at its default. `groups`
    gives each Opt.group key a title (and the order of the groups in --help); `containers`
    passes argument groups made earlier (several option classes sharing groups).
    """
    skip = set(skip)
    containers = {None: parser, **dict(containers or {})}
    for key, title in (groups or {}).items():
        containers[key] = parser.add_argument_group(title)
    for d in _declared(cls):
        if d.flag is None or d.name in skip:
            continue
        target = containers.get(d.opt.group)
        if target is None:
            target = containers[d.opt.group] = parser.add_argument_group(d.opt.group)
        kw: dict[str, Any] = {"dest": d.name, "help": _help(d)}
        if d.opt.metavar:
            kw["metavar"] = d.opt.metavar
        if d.opt.const is not None:
            kw["action"] = "store_const"
            kw["const"] = d.opt.const
        elif d.opt.parse is not None:
            kw["type"] = str
        elif d.kind is bool:
            kw["action"] = "store_false" if d.default is True else "store_true"
        elif d.kind is list:
            kw["action" if d.opt.append else "nargs"] = "append" if d.opt.append else "+"
        elif d.kind is dict:
            kw["type"] = json_object(d.opt.example)
        elif d.kind is float:
            kw["type"] = finite_float
        elif d.kind is int:
            kw["type"] = int
        if d.opt.choices is not None and d.kind is not bool and d.opt.const is None:
            kw["choices"] = [c for c in d.opt.choices if c is not None]
        # a fresh list per parse: argparse's append would otherwise grow the declared default
        kw["default"] = argparse.SUPPRESS if suppress else (list(d.default) if d.kind is list and d.default
                                                             is not None else d.default)
        target.add_argument(d.flag, *d.opt.aliases, **kw)


def _help(d: _Declared) -> str:
    text = d.opt.help.replace("%", "%%")
    if d.opt.show_default and d.kind is not bool and d.opt.const is None and d.default not in (None, [], {}):
        text += f" (default {d.default})"
    return text
