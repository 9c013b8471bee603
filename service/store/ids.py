"""Short ids: a run or sweep may be named by any unique prefix of its id, as the CLI and dashboard print it.

Ids are 32 hex digits; people copy the first 8 from a terminal or a table. A prefix must be at least
MIN_PREFIX characters (shorter ones would match by accident as the store grows) and must match exactly
one id; several matches are an AmbiguousId naming them, so the caller can pick.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import select
from sqlalchemy.orm import Session

from graddiag.service.store.runs import RunNotFound
from graddiag.service.store.sweeps import SweepNotFound
from graddiag.service.store.tables import Run, Sweep

MIN_PREFIX: Final = 6
# An ambiguous prefix names at most this many candidates: enough to pick from, a bounded error body.
MAX_CANDIDATES: Final = 10


class AmbiguousId(LookupError):
    """A prefix matches several ids; `candidates` holds (some of) them, sorted."""

    def __init__(self, what: str, prefix: str, candidates: list[str]) -> None:
        shown = ", ".join(candidates[:MAX_CANDIDATES])
        more = " and more" if len(candidates) > MAX_CANDIDATES else ""
        super().__init__(
            f"{what} id prefix {prefix!r} is ambiguous: it matches {shown}{more}; give more characters of the id"
        )
        self.what = what
        self.prefix = prefix
        self.candidates = candidates[:MAX_CANDIDATES]


def expand_id(session: Session, table: type[Run] | type[Sweep], text: str) -> str | None:
    """The full id that `text` names (itself or a unique prefix of ≥ MIN_PREFIX characters); None for no match.

    Raises AmbiguousId when the prefix matches several ids.
    """
    what = "run" if table is Run else "sweep"
    if session.scalar(select(table.id).where(table.id == text)) is not None:
        return text
    if len(text) < MIN_PREFIX or len(text) >= 32:
        return None
    # Ids are lowercase hex: a prefix copied in capitals still names its run. autoescape: '_' and '%' in
    # the input are literal characters, not LIKE wildcards.
    query = select(table.id).where(table.id.startswith(text.lower(), autoescape=True)).order_by(table.id)
    matches = list(session.scalars(query.limit(MAX_CANDIDATES + 1)))
    if len(matches) > 1:
        raise AmbiguousId(what, text, matches)
    return matches[0] if matches else None


def resolve_run_id(session: Session, text: str) -> str:
    """The id of the run `text` names (a full id or a unique prefix); raises RunNotFound or AmbiguousId."""
    run_id = expand_id(session, Run, text)
    if run_id is None:
        raise RunNotFound(text)
    return run_id


def resolve_sweep_id(session: Session, text: str) -> str:
    """The id of the sweep `text` names (a full id or a unique prefix); raises SweepNotFound or AmbiguousId."""
    sweep_id = expand_id(session, Sweep, text)
    if sweep_id is None:
        raise SweepNotFound(text)
    return sweep_id
