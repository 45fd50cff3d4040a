"""Declaring a workflow: a DAG of steps, each a call of ``queue.method(args)``.

Two ways read well and can be mixed::

    pipeline = Workflow("nightly")
    fetch = pipeline.step("fetch", queue="etl", method="fetch")
    pipeline.step("load", queue="etl", method="load", after=[fetch])

    pipeline = Workflow("nightly", [
        Step("fetch", queue="etl", method="fetch"),
        Step("load", queue="etl", method="load", after=["fetch"]),
    ])

The builder (``Workflow.step``) only accepts dependencies on steps declared
before, so it can never build a cycle; a list of steps may come in any order
and is checked as a whole with networkx. Either way a mistake raises
:class:`WorkflowDefinitionError` at declaration time, naming the steps.

Composition: a function returning a list of steps is a reusable fragment;
``Workflow.include(steps, prefix=..., after=...)`` adds a copy of it, renamed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx

from .rules import ALL_SUCCESS, check_rule

#: version of the snapshot format stored in ``wf_run.definition``
SNAPSHOT_VERSION = 1


class WorkflowDefinitionError(ValueError):
    """A workflow is not a valid DAG; ``steps`` names the offending steps."""

    def __init__(self, message: str, steps: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.steps = list(steps)


@dataclass(frozen=True)
class Step:
    """One step: the call ``queue.method(args)`` and when it may run.

    * ``after``: names of the steps it depends on (``Step`` objects work too).
    * ``trigger_rule``: one of ``rules.TRIGGER_RULES`` (default ``all_success``).
    * ``cursor_key``: serialize this step's jobs with every other job of that
      key, across runs (``str.format`` placeholders are filled from the run's
      args, e.g. ``"customer:{customer_id}"``).
    * ``retries`` / ``retry_delay``: a failed job is called again up to
      ``retries`` times, ``retry_delay`` seconds later, doubling each time.
    * ``map_over`` / ``max_items``: run one job per item of the list that the
      step ``map_over`` (an upstream step) returned; more than ``max_items``
      items fail this step.
    """

    name: str
    queue: str
    method: str
    args: dict[str, Any] = field(default_factory=dict)
    after: tuple[str, ...] = ()
    trigger_rule: str = ALL_SUCCESS
    cursor_key: str | None = None
    retries: int = 0
    retry_delay: float = 0.0
    map_over: str | None = None
    max_items: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise WorkflowDefinitionError(f"a step name must be a non-empty string, got {self.name!r}")
        if "[" in self.name or "]" in self.name:
            # "step[3]" names the items of a mapped step
            raise WorkflowDefinitionError(
                f"step {self.name!r}: names may not contain '[' or ']'", [self.name]
            )
        for what in ("queue", "method"):
            value = getattr(self, what)
            if not isinstance(value, str) or not value:
                raise WorkflowDefinitionError(
                    f"step {self.name!r}: {what} must be a non-empty string", [self.name]
                )
        if not isinstance(self.args, dict):
            raise WorkflowDefinitionError(f"step {self.name!r}: args must be a dict", [self.name])
        try:
            json.dumps(self.args, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise WorkflowDefinitionError(
                f"step {self.name!r}: args must be JSON: {exc}", [self.name]
            ) from None
        after = tuple(
            _step_name(dep) for dep in ([self.after] if isinstance(self.after, str) else self.after)
        )
        if self.map_over is not None:
            if self.max_items is None or self.max_items < 1:
                raise WorkflowDefinitionError(
                    f"step {self.name!r}: map_over needs max_items (a positive bound)", [self.name]
                )
            if self.map_over not in after:
                after = (*after, self.map_over)
        elif self.max_items is not None:
            raise WorkflowDefinitionError(
                f"step {self.name!r}: max_items only applies with map_over", [self.name]
            )
        if len(set(after)) != len(after):
            raise WorkflowDefinitionError(
                f"step {self.name!r} lists a dependency twice: {list(after)}", [self.name]
            )
        if self.name in after:
            raise WorkflowDefinitionError(f"step {self.name!r} depends on itself", [self.name])
        object.__setattr__(self, "after", after)
        try:
            check_rule(self.trigger_rule)
        except ValueError as exc:
            raise WorkflowDefinitionError(f"step {self.name!r}: {exc}", [self.name]) from None
        if not isinstance(self.retries, int) or self.retries < 0:
            raise WorkflowDefinitionError(f"step {self.name!r}: retries must be an int >= 0", [self.name])
        if self.retry_delay < 0:
            raise WorkflowDefinitionError(f"step {self.name!r}: retry_delay must be >= 0", [self.name])

    def to_snapshot(self) -> dict[str, Any]:
        """The step as stored in a run's snapshot (plain JSON)."""
        return {
            "name": self.name,
            "queue": self.queue,
            "method": self.method,
            "args": self.args,
            "after": list(self.after),
            "trigger_rule": self.trigger_rule,
            "cursor_key": self.cursor_key,
            "retries": self.retries,
            "retry_delay": self.retry_delay,
            "map_over": self.map_over,
            "max_items": self.max_items,
        }


def _step_name(dep: str | Step) -> str:
    return dep.name if isinstance(dep, Step) else dep


class Workflow:
    """A named DAG of :class:`Step`; validated as it is declared."""

    def __init__(self, name: str, steps: Iterable[Step] = ()) -> None:
        if not isinstance(name, str) or not name:
            raise WorkflowDefinitionError(f"a workflow name must be a non-empty string, got {name!r}")
        self.name = name
        self._steps: dict[str, Step] = {}
        self._add_all(list(steps))

    # -- declaring ------------------------------------------------------------

    def step(
        self,
        name: str,
        *,
        queue: str,
        method: str,
        args: dict[str, Any] | None = None,
        after: Iterable[str | Step] | str | Step = (),
        **options: Any,
    ) -> Step:
        """Declare a step that depends on steps declared before; return it.

        ``options`` are the other fields of :class:`Step` (``trigger_rule``,
        ``cursor_key``, ``retries``, ``retry_delay``, ``map_over``, ``max_items``).
        """
        deps = (after,) if isinstance(after, str | Step) else tuple(after)
        step = Step(name, queue, method, dict(args or {}), tuple(_step_name(d) for d in deps), **options)
        if step.name in self._steps:
            raise WorkflowDefinitionError(
                f"workflow {self.name!r}: duplicate step name {step.name!r}", [step.name]
            )
        unknown = [d for d in step.after if d not in self._steps]
        if unknown:
            raise WorkflowDefinitionError(
                f"workflow {self.name!r}: step {step.name!r} depends on unknown step(s) {', '.join(map(repr, unknown))}",
                [step.name, *unknown],
            )
        # every dependency exists already, so this step cannot close a cycle
        self._steps[step.name] = step
        return step

    def include(
        self, steps: Iterable[Step] | Workflow, *, prefix: str = "", after: Iterable[str | Step] = ()
    ) -> list[Step]:
        """Add a copy of ``steps`` (a fragment or another workflow); return the copies.

        Every name and internal dependency gets ``prefix``; the fragment's roots
        also depend on ``after`` (steps of this workflow).
        """
        source = list(steps.steps if isinstance(steps, Workflow) else steps)
        inner = {s.name for s in source}
        extra = tuple(_step_name(d) for d in after)
        copies = []
        for s in source:
            deps = tuple(prefix + d if d in inner else d for d in s.after)
            if not s.after:
                deps = extra
            copies.append(
                replace(
                    s,
                    name=prefix + s.name,
                    after=deps,
                    map_over=None if s.map_over is None else prefix + s.map_over,
                )
            )
        self._add_all(copies)
        return copies

    # -- reading --------------------------------------------------------------

    @property
    def steps(self) -> list[Step]:
        """The steps in a topological order (dependencies first)."""
        return [self._steps[name] for name in nx.lexicographical_topological_sort(self.graph())]

    def __getitem__(self, name: str) -> Step:
        return self._steps[name]

    def __contains__(self, name: object) -> bool:
        return name in self._steps

    def __len__(self) -> int:
        return len(self._steps)

    def graph(self) -> nx.DiGraph:
        """The DAG as a networkx ``DiGraph`` (edge: dependency -> dependent)."""
        g = nx.DiGraph()
        g.add_nodes_from(self._steps)
        g.add_edges_from((dep, s.name) for s in self._steps.values() for dep in s.after)
        return g

    def to_snapshot(self) -> dict[str, Any]:
        """The definition as plain JSON, as a run stores it."""
        return {
            "version": SNAPSHOT_VERSION,
            "name": self.name,
            "steps": [s.to_snapshot() for s in self.steps],
        }

    def __repr__(self) -> str:
        return f"<Workflow {self.name!r} steps={len(self._steps)}>"

    # -- validation -----------------------------------------------------------

    def _add_all(self, steps: list[Step]) -> None:
        merged = dict(self._steps)
        for s in steps:
            if not isinstance(s, Step):
                raise WorkflowDefinitionError(f"workflow {self.name!r}: expected Step objects, got {s!r}")
            if s.name in merged:
                raise WorkflowDefinitionError(
                    f"workflow {self.name!r}: duplicate step name {s.name!r}", [s.name]
                )
            merged[s.name] = s
        _validate(self.name, merged)
        self._steps = merged


def _validate(workflow: str, steps: dict[str, Step]) -> None:
    unknown = {s.name: [d for d in s.after if d not in steps] for s in steps.values()}
    unknown = {name: deps for name, deps in unknown.items() if deps}
    if unknown:
        detail = "; ".join(
            f"{name!r} depends on {', '.join(map(repr, deps))}" for name, deps in unknown.items()
        )
        offending = [n for name, deps in unknown.items() for n in (name, *deps)]
        raise WorkflowDefinitionError(f"workflow {workflow!r}: unknown dependencies: {detail}", offending)
    g = nx.DiGraph()
    g.add_nodes_from(steps)
    g.add_edges_from((dep, s.name) for s in steps.values() for dep in s.after)
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return
    names = [edge[0] for edge in cycle]
    path = " -> ".join([*names, names[0]])
    raise WorkflowDefinitionError(f"workflow {workflow!r} has a cycle: {path}", names)
