"""Command-line flags from dataclass fields: the one builder behind every entry point's ``--help``.

A field made with `flag` carries its help text and, optionally, ``choices``, ``group`` (the help
section, when the caller does not name one), ``required`` and ``aliases`` (more spellings of the
flag). The flag's type comes from the field's annotation, resolved as Python resolves it
(``int | None`` parses as int, not as the annotation's text). This module imports the standard
library only.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

FLAG_TYPES = (bool, int, float, str)


def flag(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field that is also a command-line flag."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def flag_type(annotation: Any) -> type:
    """The type a flag's value is parsed as: ``int`` -> int, ``int | None`` -> int, ``str | None`` -> str.

    >>> flag_type(int | None), flag_type(typing.Optional[float]), flag_type(str)
    (<class 'int'>, <class 'float'>, <class 'str'>)
    """
    members = [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [t for t in typing.get_args(annotation) if t is not type(None)]
    if len(members) != 1 or members[0] not in FLAG_TYPES:
        raise TypeError(f"a flag needs one of {[t.__name__ for t in FLAG_TYPES]} (or it | None), got {annotation!r}")
    return members[0]


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` names each default, except where there is none (None) or the flag is required."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help = action.help or ""
        # A help text that names its default itself ("(default: each JSON file's folder)") keeps its own.
        if ("%(default)" in help or "(default" in help or action.required
                or action.default in (None, argparse.SUPPRESS)):
            return help
        return help + " (default: %(default)s)"


def add_flags(parser: argparse.ArgumentParser, cls: type, group: str | None = None) -> None:
    """One flag per field of the dataclass `cls`, under the help section `group` (else each field's
    ``group`` metadata). Booleans get ``--name`` / ``--no-name``."""
    annotations = typing.get_type_hints(cls)  # `from __future__ import annotations` leaves strings
    sections: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        title = group or f.metadata["group"]
        if title not in sections:
            sections[title] = parser.add_argument_group(title)
        kind = flag_type(annotations[f.name])
        kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"]}
        if f.metadata.get("required"):
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        sections[title].add_argument(f"--{f.name}", *f.metadata.get("aliases", ()), **kwargs)


def values_of(cls: type, values: dict[str, Any]) -> Any:
    """An instance of the dataclass `cls` from parsed flag values (by field name)."""
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})
