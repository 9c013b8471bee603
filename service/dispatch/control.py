"""RunControl: one dispatcher's mailbox for its tasks, their progress in and its stop requests out.

Kept apart from the tasks, with plain data only (no engine types): the actor's worker process then
imports neither torch nor graddiag's engine to answer its calls.
"""

from __future__ import annotations

from typing import TypedDict

import ray


class ProgressFields(TypedDict):
    """A task's latest progress, as queue.progress_record takes it."""

    step: int
    steps: int
    loss: float | None
    label_so_far: str | None


class RunControl:
    """Progress and stop flags of one dispatcher's runs, by run key ("<run id>:<attempt>").

    Owned by the dispatcher, so it dies with it; tasks then stop (nobody would record their results).
    Restarted by Ray if its node fails, empty: the dispatcher repeats its stop requests every heartbeat.
    """

    def __init__(self) -> None:
        self._progress: dict[str, ProgressFields] = {}
        self._stop: set[str] = set()

    def exchange(self, key: str, progress: ProgressFields | None) -> bool:
        """Task → dispatcher: the latest progress (None: none since the last call); True to stop."""
        if progress is not None:
            self._progress[key] = progress
        return key in self._stop

    def stop(self, keys: list[str]) -> None:
        """Ask the tasks of these runs to stop."""
        self._stop.update(keys)

    def take_progress(self) -> dict[str, ProgressFields]:
        """The progress reported since the last call, by run key."""
        progress, self._progress = self._progress, {}
        return progress

    def forget(self, key: str) -> None:
        """The run's task has ended."""
        self._stop.discard(key)
        self._progress.pop(key, None)


# No CPU of its own (it answers short calls); restarted wherever Ray can when its node dies.
RunControlActor = ray.remote(num_cpus=0, max_restarts=-1)(RunControl)
