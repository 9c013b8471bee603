"""Command-line flags generated from pydantic models, shared by the local and the remote commands.

Every field becomes a kebab-case string flag and pydantic parses the values, so a bad value is
reported by the model's own validation, naming the field.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from graddiag.models.spec import Spec

# Exit status of a command given an invalid spec or settings.
EXIT_INVALID = 2


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel], skip: Sequence[str] = ()) -> None:
    """One string flag per field; pydantic does the parsing so errors name the field."""
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        if field.annotation is bool:
            parser.add_argument(
                _flag(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=field.description,
            )
        else:
            parser.add_argument(_flag(name), dest=name, default=None, metavar="VALUE", help=field.description)


def given_values(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The fields of `model` given on the command line; 'none' or 'null' mean an explicit None."""
    values = {name: getattr(args, name, None) for name in model.model_fields}
    return {
        k: (None if isinstance(v, str) and v.lower() in ("none", "null") else v)
        for k, v in values.items()
        if v is not None
    }


def format_validation_error(error: ValidationError, what: str = "spec") -> str:
    """'invalid <what>:' and one line per offending field: 'field: what is wrong'."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or what
        lines.append(f"  {where}: {item['msg']}")
    return f"invalid {what}:\n" + "\n".join(lines)


def load_spec(spec_file: str | None, overrides: dict[str, Any]) -> Spec:
    """A spec from an optional JSON file, with command-line values taking precedence."""
    base: dict[str, Any] = {}
    if spec_file:
        try:
            base = json.loads(Path(spec_file).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read spec file {spec_file}: {exc}") from exc
        if not isinstance(base, dict):
            raise ValueError(f"spec file {spec_file} must hold a JSON object")
    return Spec.model_validate({**base, **overrides})
