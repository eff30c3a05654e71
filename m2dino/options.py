"""An option declared once: `option(default, help)` is a dataclass field whose metadata holds
its one-line help, whether it may change when a run resumes, and how a command-line or YAML
value is read where its type alone cannot say. The part that owns an option declares it in its
own dataclass (the model's in m2dino.models.configs, training's in m2dino.training.config);
the command line, the YAML keys, the resume check and the docs' option table are generated
from these declarations. No torch here: the command lines read them before torch is imported.

    epochs: int = option(7, "training epochs per model", resumable=True)

The type is the annotation (`Literal[...]` lists the choices); the help names no default: the
default is shown from the declaration ("default: 7"), and `unset` says what a None default means.
"""
from __future__ import annotations

import functools
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Literal, get_args, get_origin

_NONE_WORDS = ("", "none", "null")
_TRUE_WORDS = ("true", "yes", "1", "on")
_BOOL_WORDS = _TRUE_WORDS + ("false", "no", "0", "off")


def option(default: Any = MISSING, help: str = "", *, factory: Callable[[], Any] | Any = MISSING,
           resumable: bool = False, name: str | None = None, parse: Callable[[Any], Any] | None = None,
           unset: str | None = None, metavar: str | None = None, many: bool = False) -> Any:
    """A dataclass field declared as an option.

    default / factory: the default value (factory for a mutable one); help: one line, no default in
    it; resumable: may differ from the run's config.yaml on --resume; name: the option's name when
    it is not the field's (the model's `name` is `--model`); parse: reads a command-line string or
    a YAML value (errors name the option), for types the annotation cannot read; unset: what a
    None default means, shown as the default; metavar: the value's name in --help; many: the
    command line takes several words (`--tasks a b`)."""
    metadata = dict(help=help, resumable=resumable, name=name, parse=parse, unset=unset, metavar=metavar,
                    many=many)
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"option": metadata})
    return field(default=default, metadata={"option": metadata})


@dataclass(frozen=True)
class Option:
    """One declared option, read from its dataclass: what the generators need."""

    field: str          # the dataclass field
    name: str           # the option's name: --name with - for _, the YAML key (with _ or -)
    kind: Any           # the field's type, evaluated
    default: Any        # the default value (a factory's product)
    help: str
    resumable: bool
    parse: Callable[[Any], Any] | None
    unset: str | None
    metavar: str | None
    many: bool

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def choices(self) -> tuple[str, ...] | None:
        """The values of a Literal type (None for an open type)."""
        kind = _without_none(self.kind)
        return tuple(get_args(kind)) if get_origin(kind) is Literal else None

    @property
    def optional(self) -> bool:
        return type(None) in get_args(self.kind)

    def shown_default(self) -> str | None:
        """The default as --help and the docs show it (None: nothing to show)."""
        if self.default is None:
            return self.unset
        if isinstance(self.default, dict):
            return ",".join(f"{k}={v}" for k, v in self.default.items()) or None
        if isinstance(self.default, (list, tuple)):
            return ",".join(str(v) for v in self.default) or None
        return str(self.default)

    def read(self, value: Any) -> Any:
        """A command-line string or a YAML value -> the field's type; errors name the option."""
        if self.parse is not None:
            return self.parse(value)
        if value is None or (self.optional and isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
            return None
        kind = _without_none(self.kind)
        if kind is bool:
            if isinstance(value, str):
                if value.strip().lower() not in _BOOL_WORDS:
                    raise ValueError(f"{self.flag}: cannot use {value!r} (expected bool)")
                return value.strip().lower() in _TRUE_WORDS
            return bool(value)
        if kind in (int, float):
            return as_number(self.name, value, kind)
        return str(value)


def _without_none(kind):
    """X from Optional[X] (and X itself otherwise)."""
    args = [a for a in get_args(kind) if a is not type(None)]
    return args[0] if type(None) in get_args(kind) and len(args) == 1 else kind


@functools.cache
def options_of(cls) -> tuple[Option, ...]:
    """The options a dataclass declares, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        meta = f.metadata.get("option")
        if meta is None:
            continue
        default = f.default_factory() if f.default is MISSING else f.default
        out.append(Option(field=f.name, name=meta["name"] or f.name, kind=hints[f.name], default=default,
                          help=meta["help"], resumable=meta["resumable"], parse=meta["parse"],
                          unset=meta["unset"], metavar=meta["metavar"], many=meta["many"]))
    return tuple(out)


def as_number(name: str, value, kind):
    """`value` as an int or a float; an error names the option (a float with a fraction is no int)."""
    try:
        if kind is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"--{name.replace('_', '-')}: cannot use {value!r} (expected {kind.__name__})") from None


def split_words(value) -> list:
    """A list from YAML, or the items of a string separated by commas and/or spaces."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return [v for v in str(value).replace(",", " ").split() if v]


def problem(name: str, why: str) -> ValueError:
    """The error of an impossible value, naming its option as the command line spells it."""
    return ValueError(f"--{name.replace('_', '-')}: {why}")
