"""Names and tags of runs and sweeps: given at submit time, edited later, filtered on.

A name is free text (1–200 characters); tags are up to MAX_TAGS short labels (1–50 characters each, as
external reports take them), kept distinct in the order given. Both are stored as given, after trimming
surrounding whitespace; an empty name clears it.
"""

from __future__ import annotations

from typing import Annotated, Final

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from graddiag.service.store.runs import RunNotFound, get_run
from graddiag.service.store.sweeps import SweepNotFound
from graddiag.service.store.tables import Run, Sweep

MAX_TAGS: Final = 20
Name = Annotated[str, StringConstraints(strip_whitespace=True, max_length=200)]
Tag = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=50)]


class Labels(BaseModel):
    """A name and tags; a field left out is left as it is (PATCH), `name: ""` or null clears the name."""

    model_config = ConfigDict(extra="forbid")

    name: Name | None = Field(None, description="A name to know it by (1–200 characters); empty or null clears it.")
    tags: list[Tag] | None = Field(
        None, max_length=MAX_TAGS, description=f"Up to {MAX_TAGS} labels of 1–50 characters; [] clears them."
    )

    @field_validator("tags")
    @classmethod
    def _distinct(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else list(dict.fromkeys(value))

    def values(self) -> dict[str, object]:
        """The columns to write: only the fields the request set."""
        given = self.model_dump(include=self.model_fields_set)
        if "name" in given and not given["name"]:
            given["name"] = None
        return given


def label_run(session: Session, run_id: str, labels: Labels) -> Run:
    """Set the run's name and/or tags and commit; raises RunNotFound."""
    values = labels.values()
    if values:
        changed = session.execute(update(Run).where(Run.id == run_id).values(**values).returning(Run.id)).first()
        if changed is None:
            session.rollback()
            raise RunNotFound(run_id)
        session.commit()
    return get_run(session, run_id)


def label_sweep(session: Session, sweep_id: str, labels: Labels) -> Sweep:
    """Set the sweep's name and/or tags and commit; raises SweepNotFound."""
    values = labels.values()
    if values:
        changed = session.execute(update(Sweep).where(Sweep.id == sweep_id).values(**values).returning(Sweep.id))
        if changed.first() is None:
            session.rollback()
            raise SweepNotFound(sweep_id)
        session.commit()
    sweep = session.scalar(select(Sweep).where(Sweep.id == sweep_id).execution_options(populate_existing=True))
    if sweep is None:
        raise SweepNotFound(sweep_id)
    return sweep
