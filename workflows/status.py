"""What ``WorkflowSource.get_run`` and ``list_runs`` return: plain data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .rules import RunStates, StepStates


@dataclass(frozen=True)
class StepStatus:
    """One step of a run (or one item of a mapped step) as of the read."""

    name: str
    #: one of ``StepStates.ALL``; ``running`` while a queued step's job runs
    state: str
    #: jobs called for this step so far (retries included)
    attempts: int
    job_id: int | None
    queued_time: datetime | None
    start_time: datetime | None
    end_time: datetime | None
    #: the job's result once completed
    result: Any
    #: the error result once failed (``{"type", "message", ...}`` for an exception)
    error: Any
    #: upstream steps, and the trigger rule deciding on them
    after: list[str] = field(default_factory=list)
    trigger_rule: str | None = None
    #: for a map item: its mapped step and position
    parent: str | None = None
    index: int | None = None

    @property
    def duration(self) -> float | None:
        """Seconds from start to end, when both are known."""
        if self.start_time is None or self.end_time is None:
            return None
        return (self.end_time - self.start_time).total_seconds()


@dataclass(frozen=True)
class RunSummary:
    """A run without its steps (``list_runs``)."""

    id: int
    workflow: str
    key: str | None
    state: str
    created_time: datetime
    finished_time: datetime | None

    @property
    def finished(self) -> bool:
        return self.state in RunStates.TERMINAL


@dataclass(frozen=True)
class RunStatus(RunSummary):
    """A run and all its steps, in a topological order (items after their step)."""

    args: dict[str, Any] = field(default_factory=dict)
    #: the results of the sink steps, by name, once the run finished
    result: Any = None
    steps: list[StepStatus] = field(default_factory=list)

    def step(self, name: str) -> StepStatus:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def states(self) -> dict[str, str]:
        """``{step name: state}`` of the declared steps (map items left out)."""
        return {s.name: s.state for s in self.steps if s.parent is None}

    @property
    def failed_steps(self) -> list[str]:
        return [s.name for s in self.steps if s.parent is None and s.state == StepStates.FAILED]
