"""What a run listing can filter and sort on: every spec field, the run's state and its result metrics.

Spec fields with their own indexed column (SPEC_COLUMNS) are compared there; the others are read from
the spec JSON. Result metrics are the verdict's evidence numbers (`decades_per_layer`,
`act_decades_per_layer`, `rel_grad_median`, …), the held-out evaluation (`eval_accuracy`, `eval_loss`,
`train_accuracy`, `train_loss`, `generalization_gap`) and the timing (`total_s`, `step_ms`), read from
their JSON columns; a run without them (not succeeded) has NULL there, which sorts last.

`filter` is an MLflow-style expression: clauses `NAME OP VALUE` joined by `and`, e.g.
``verdict = 'vanishing' and decades_per_layer < -0.3 and steps >= 30``. Values are numbers, quoted
strings, true/false or null (`= null`, `!= null`). Every name, operator and value is checked before any
SQL is built, and a mistake is a ValueError naming what was wrong and what is allowed.
"""

from __future__ import annotations

import json
import re
import types
from dataclasses import dataclass
from typing import Any, Final, Literal, Union, get_args, get_origin

from sqlalchemy import ColumnElement, String, and_, case, cast, null
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.sql.elements import KeyedColumnElement

from graddiag.models.spec import Spec
from graddiag.service.engine.report import Evidence, Label
from graddiag.service.store.tables import SPEC_COLUMNS, STATUSES, Run

# Spec fields without a column of their own: read from the spec JSON.
JSON_SPEC_FIELDS: Final[tuple[str, ...]] = tuple(name for name in Spec.model_fields if name not in SPEC_COLUMNS)

# Result metrics: name → (JSON column of `runs`, key in it).
METRICS: Final[dict[str, tuple[str, str]]] = {
    **{name: ("evidence", name) for name in Evidence.model_fields},
    "eval_loss": ("eval_result", "loss"),
    "eval_accuracy": ("eval_result", "accuracy"),
    "train_loss": ("eval_result", "train_loss"),
    "train_accuracy": ("eval_result", "train_accuracy"),
    "generalization_gap": ("eval_result", "generalization_gap"),
    "total_s": ("timing", "total_s"),
    "step_ms": ("timing", "step_ms"),
}

# Columns of `runs` a listing sorts on besides the spec fields and metrics.
_RUN_COLUMNS: Final[tuple[str, ...]] = ("created_at", "started_at", "finished_at", "status", "verdict", "name")

SORTABLE: Final[frozenset[str]] = frozenset({*_RUN_COLUMNS, *SPEC_COLUMNS, *JSON_SPEC_FIELDS, *METRICS})

Kind = Literal["number", "string", "bool"]


@dataclass(frozen=True)
class FieldInfo:
    """How a filterable name compares: its kind and, for a closed set of strings, the allowed values (for a
    number, the words it may hold instead of one)."""

    kind: Kind
    allowed: tuple[str, ...] | None = None


def _spec_field_info(name: str) -> FieldInfo:
    annotation = Spec.model_fields[name].annotation
    # `float | None` and friends: the non-None member decides.
    if get_origin(annotation) in (Union, types.UnionType):
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        words = tuple(str(value) for arg in members if get_origin(arg) is Literal for value in get_args(arg))
        if words and any(arg in (int, float) for arg in members):
            # A number or a named setting (forget_bias: a float or 'chrono'): the words compare with = and !=.
            return FieldInfo("number", words)
        annotation = members[0]
    if annotation is bool:
        return FieldInfo("bool")
    if annotation in (int, float):
        return FieldInfo("number")
    if get_origin(annotation) is Literal:
        return FieldInfo("string", tuple(str(value) for value in get_args(annotation)))
    return FieldInfo("string")


FIELDS: Final[dict[str, FieldInfo]] = {
    **{name: _spec_field_info(name) for name in Spec.model_fields},
    "status": FieldInfo("string", STATUSES),
    "verdict": FieldInfo("string", get_args(Label)),
    "sweep_id": FieldInfo("string"),
    "name": FieldInfo("string"),
    **dict.fromkeys(METRICS, FieldInfo("number")),
}


def field_expression(name: str) -> KeyedColumnElement[Any] | ColumnElement[Any]:
    """The SQL expression of a filterable or sortable name (a column, or a typed read from a JSON column)."""
    if name in _RUN_COLUMNS or name in SPEC_COLUMNS or name == "sweep_id":
        column: KeyedColumnElement[Any] = getattr(Run, name)
        return column
    if name in METRICS:
        table_column, key = METRICS[name]
        return getattr(Run, table_column)[key].as_float()
    value = Run.spec[name]
    info = FIELDS[name]
    if info.kind == "number" and info.allowed:
        # A word where a number may stand reads as NULL here: PostgreSQL's cast of it to a float would fail.
        return case((value.as_string().in_(info.allowed), null()), else_=value.as_float())
    if info.kind == "number":
        return value.as_float()
    if info.kind == "bool":
        return value.as_boolean()
    return value.as_string()


def equals(name: str, value: float | str | bool) -> ColumnElement[bool]:
    """`name` = `value`, where a word given for a number field (forget_bias = 'chrono') compares as text."""
    if isinstance(value, str) and FIELDS[name].kind == "number":
        return Run.spec[name].as_string() == value
    return field_expression(name) == value


def sort_expression(sort: str) -> ColumnElement[Any]:
    """ORDER BY for `sort` (a SORTABLE name, '-' for descending), NULLs last on every backend."""
    expression = field_expression(sort.removeprefix("-"))
    order = expression.desc() if sort.startswith("-") else expression.asc()
    return order.nulls_last()


# --- the filter expression --------------------------------------------------------------------------------

MAX_FILTER_CHARS: Final = 2000
# Clauses are ANDed; bounded so the SQL expression stays shallow (SQLite refuses depth > 1000).
MAX_CLAUSES: Final = 50
OPERATORS: Final[tuple[str, ...]] = ("<=", ">=", "!=", "==", "=", "<", ">")
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
      | (?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
      | (?P<op><=|>=|!=|==|=|<|>)
      | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<other>\S)
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class Clause:
    """One `NAME OP VALUE` of a filter; `value` is a float, str, bool or None."""

    name: str
    op: str
    value: float | str | bool | None


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens = []
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup
        if kind is None:  # only trailing whitespace
            continue
        value = match.group(kind)
        if kind == "other":
            raise ValueError(f"unexpected character {value!r} at position {match.start(kind)}")
        tokens.append((kind, value))
    return tokens


def _value(kind: str, text: str) -> float | str | bool | None:
    if kind == "string":
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    if kind == "number":
        return float(text)
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "null":
        return None
    raise ValueError(f"{text!r} is not a value: use a number, a quoted string, true, false or null")


def _check(clause: Clause) -> None:
    info = FIELDS[clause.name]
    if clause.value is None:
        if clause.op not in ("=", "==", "!="):
            raise ValueError(f"{clause.name} {clause.op} null: null compares with = or != only")
        return
    if info.kind == "number":
        if isinstance(clause.value, str) and info.allowed and clause.value in info.allowed:
            if clause.op not in ("=", "!="):
                raise ValueError(f"{clause.name} = {clause.value!r} compares with = or != only, not {clause.op}")
            return
        if isinstance(clause.value, bool) or not isinstance(clause.value, float):
            words = f" or one of {', '.join(repr(w) for w in info.allowed)}" if info.allowed else ""
            raise ValueError(f"{clause.name} is a number{words}: compare it with a number, e.g. {clause.name} < 0.5")
        return
    if clause.op not in ("=", "==", "!="):
        raise ValueError(f"{clause.name} compares with = or != only, not {clause.op}")
    if info.kind == "bool":
        if not isinstance(clause.value, bool):
            raise ValueError(f"{clause.name} is true or false")
        return
    if not isinstance(clause.value, str):
        raise ValueError(f"{clause.name} is text: quote the value, e.g. {clause.name} = 'value'")
    if info.allowed is not None and clause.value not in info.allowed:
        raise ValueError(f"{clause.name} is one of {', '.join(info.allowed)}; got {clause.value!r}")


def parse_filter(text: str) -> list[Clause]:
    """The clauses of a filter expression; raises ValueError naming the first mistake and what is allowed."""
    if len(text) > MAX_FILTER_CHARS:
        raise ValueError(f"the filter is {len(text)} characters long; at most {MAX_FILTER_CHARS}")
    tokens = _tokens(text)
    clauses: list[Clause] = []
    position = 0
    while position < len(tokens):
        if clauses:
            kind, word = tokens[position]
            if kind != "word" or word.lower() != "and":
                raise ValueError(f"expected 'and' between clauses, got {word!r}")
            position += 1
        part = tokens[position : position + 3]
        if len(part) < 3:
            raise ValueError("a clause is NAME OP VALUE, e.g. decades_per_layer < -0.3; this one is incomplete")
        (name_kind, name), (op_kind, op), (value_kind, value_text) = part
        if name_kind != "word" or name not in FIELDS:
            raise ValueError(f"unknown name {name!r}: filter on one of {', '.join(sorted(FIELDS))}")
        if op_kind != "op":
            raise ValueError(f"expected an operator ({', '.join(OPERATORS)}) after {name}, got {op!r}")
        if value_kind not in ("string", "number", "word"):
            raise ValueError(f"expected a value after {name} {op}, got {value_text!r}")
        clause = Clause(name, "=" if op == "==" else op, _value(value_kind, value_text))
        _check(clause)
        clauses.append(clause)
        if len(clauses) > MAX_CLAUSES:
            raise ValueError(f"at most {MAX_CLAUSES} clauses")
        position += 3
    if not clauses:
        raise ValueError("the filter is empty; e.g. verdict = 'vanishing' and decades_per_layer < -0.3")
    return clauses


def clause_condition(clause: Clause) -> ColumnElement[bool]:
    """The SQL condition of a checked clause."""
    expression = field_expression(clause.name)
    value = clause.value
    if value is None:
        return expression.is_(None) if clause.op == "=" else expression.is_not(None)
    if clause.op == "=":
        return equals(clause.name, value)
    if clause.op == "!=":
        # SQL's NULL != x is unknown; a run without the value does differ from it.
        if isinstance(value, str) and FIELDS[clause.name].kind == "number":
            expression = Run.spec[clause.name].as_string()
        return (expression != value) | expression.is_(None)
    return {"<": expression < value, "<=": expression <= value, ">": expression > value, ">=": expression >= value}[
        clause.op
    ]


def filter_condition(clauses: list[Clause]) -> ColumnElement[bool]:
    """All clauses ANDed."""
    return and_(*(clause_condition(clause) for clause in clauses))


# The result metrics a listed run carries (the runs table's key numbers).
KEY_METRICS: Final[tuple[str, ...]] = (
    "decades_per_layer",
    "act_decades_per_layer",
    "rel_grad_median",
    "eval_accuracy",
    "eval_loss",
    "total_s",
)


def run_metrics(run: Run) -> dict[str, float | None]:
    """The KEY_METRICS of a run from its stored evidence, evaluation and timing (None where it has none)."""
    values: dict[str, float | None] = {}
    for name in KEY_METRICS:
        table_column, key = METRICS[name]
        value = (getattr(run, table_column) or {}).get(key)
        values[name] = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
    return values


def has_tag(column: InstrumentedAttribute[list[str] | None], tag: str) -> ColumnElement[bool]:
    """Rows whose tags include `tag`: the tag as JSON text, quoted, inside the column's JSON text.

    Portable (SQLite and PostgreSQL alike) and exact: the quotes delimit a whole tag, and the tag is
    written the way the column's JSON writes it (json.dumps, escapes included); autoescape keeps '%' and
    '_' literal.
    """
    return cast(column, String).contains(json.dumps(tag), autoescape=True)


def name_contains(column: InstrumentedAttribute[str | None], text: str) -> ColumnElement[bool]:
    """Rows whose name contains `text`, ignoring case."""
    return column.icontains(text, autoescape=True)
