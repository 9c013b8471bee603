"""Command-line flags generated from pydantic models, shared by the local and the remote commands.

Every field becomes a kebab-case string flag and pydantic parses the values, so a bad value is
reported by the model's own validation, naming the field.
"""

from __future__ import annotations

import argparse
import json
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo

from graddiag.models.spec import Spec, combination_field

# Exit status of a command given an invalid spec or settings.
EXIT_INVALID = 2


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choices(annotation: Any) -> tuple[Any, ...] | None:
    """The values a Literal (or an optional Literal) allows; None for other types."""
    members = [arg for arg in _members(annotation) if arg is not type(None)]
    annotation = members[0] if len(members) == 1 else None
    return get_args(annotation) if get_origin(annotation) is Literal else None


def _members(annotation: Any) -> tuple[Any, ...]:
    """The types of a union (a plain type is a union of one)."""
    return get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)


def _mixed(annotation: Any) -> str | None:
    """What a union of a number and named values allows, e.g. forget_bias's "a number, chrono or none";
    None for other types."""
    members = _members(annotation)
    named = [value for member in members if get_origin(member) is Literal for value in get_args(member)]
    if not named or not any(member in (int, float) for member in members):
        return None
    words = ["a number", *map(str, named), *(["none"] if type(None) in members else [])]
    return ", ".join(words[:-1]) + " or " + words[-1]


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


# Literals with this many values or fewer are spelt out in the flag's metavar ({a,b,c}) rather than the help.
_METAVAR_CHOICES = 4


def _bounds(field: FieldInfo) -> str | None:
    """A number's allowed interval from the field's constraints, e.g. "[1, 100]" or "(0, 10]"."""
    low = high = None
    for item in field.metadata:
        for attr, bracket in (("ge", "["), ("gt", "(")):
            if getattr(item, attr, None) is not None:
                low = f"{bracket}{_number(getattr(item, attr))}"
        for attr, bracket in (("le", "]"), ("lt", ")")):
            if getattr(item, attr, None) is not None:
                high = f"{_number(getattr(item, attr))}{bracket}"
    if low is None and high is None:
        return None
    return f"{low or '(-inf'}, {high or 'inf)'}"


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, SecretStr):
        return "set" if value.get_secret_value() else "none"
    return str(value)


def field_help(field: FieldInfo) -> str:
    """A flag's help: the field's description, then what it allows and its default (``%`` escaped for argparse)."""
    description = field.description or ""
    parts = [description]
    choices = _choices(field.annotation)
    if choices is not None:
        parts.append(f"One of: {', '.join(map(str, choices))}.")
    elif (mixed := _mixed(field.annotation)) is not None:
        parts.append(f"Allowed: {mixed}.")
    elif (bounds := _bounds(field)) is not None and bounds not in description:
        parts.append(f"Allowed: {bounds}.")
    parts.append(f"Default: {_shown(field.get_default(call_default_factory=True))}.")
    return " ".join(part for part in parts if part).replace("%", "%%")


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel], skip: Sequence[str] = ()) -> None:
    """One string flag per field; pydantic does the parsing so errors name the field. The help lists each
    field's allowed values (or interval) and its default."""
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        if field.annotation is bool:
            parser.add_argument(
                _flag(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=field_help(field),
            )
        else:
            choices = _choices(field.annotation)
            short = choices is not None and len(choices) <= _METAVAR_CHOICES
            metavar = "{" + ",".join(map(str, choices or ())) + "}" if short else "VALUE"
            parser.add_argument(_flag(name), dest=name, default=None, metavar=metavar, help=field_help(field))


def given_values(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The fields of `model` given on the command line; 'none' or 'null' mean an explicit None for a field
    that takes None (clip_value, forget_bias), and stay words for the others (`--norm none` is norm 'none')."""
    given = {name: getattr(args, name, None) for name in model.model_fields}
    return {
        name: None
        if isinstance(value, str)
        and value.lower() in ("none", "null")
        and type(None) in _members(model.model_fields[name].annotation)
        else value
        for name, value in given.items()
        if value is not None
    }


def format_validation_error(error: ValidationError, what: str = "spec") -> str:
    """'invalid <what>:' and one line per offending field: 'field: what is wrong'.

    A value that fits no member of a union (forget_bias: a number or 'chrono') gets one error per member,
    located `field.<member>`; they are joined into one line for the field with "or". A spec's refused
    combination (located nowhere by pydantic) is put under the field its message names.
    """
    problems: dict[str, list[str]] = {}
    for item in error.errors():
        loc, message = item["loc"], item["msg"]
        # The models are flat: a second, textual location part is pydantic's tag of a union member.
        parts = loc[:1] if len(loc) == 2 and isinstance(loc[1], str) else loc
        if not loc and error.title == Spec.__name__:  # a refused combination: located at the field it names
            parts, message = (combination_field(message) or what,), message.removeprefix("Value error, ")
        problems.setdefault(".".join(str(part) for part in parts) or what, []).append(message)
    lines = [f"  {where}: {' or '.join(messages)}" for where, messages in problems.items()]
    return f"invalid {what}:\n" + "\n".join(lines)


def read_spec_file(spec_file: str | None) -> dict[str, Any]:
    """The fields of a JSON spec file as written (none without a file); ValueError when it cannot be read."""
    if not spec_file:
        return {}
    try:
        fields = json.loads(Path(spec_file).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read spec file {spec_file}: {exc}") from exc
    if not isinstance(fields, dict):
        raise ValueError(f"spec file {spec_file} must hold a JSON object")
    return fields


def load_spec(spec_file: str | None, overrides: dict[str, Any]) -> Spec:
    """A spec from an optional JSON file, with command-line values taking precedence."""
    return Spec.model_validate({**read_spec_file(spec_file), **overrides})
