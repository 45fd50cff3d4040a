"""Advancing a run: the state changes shared by the coordinator and the source.

Everything here runs inside a transaction that holds the run's row lock
(``SELECT .. FOR UPDATE`` on ``wf_run``), so no two actors ever change the
steps of one run at the same time: coordinators of a run are serialized by
their cursor anyway, and ``start``/``cancel_run``/``retry_step`` take the same
lock.

A :class:`RunAdvancer` works in rounds. Steps that became terminal decrement
their dependents' ``waiting_on`` (one UPDATE per round); the dependents that
reach zero are decided by their trigger rule (enqueued, mapped, skipped or
canceled); skipped and canceled ones are terminal in turn and feed the next
round. Each round reads and writes only the steps that changed and their
direct neighbours, which is why an advance costs O(changed steps + their
edges), never O(run).

The rows an advance has read are held in memory and are the truth for the
rest of its transaction (nobody else writes them: the run is locked). Changes
to them are written once, at the end, together with the run's row; reads in
between take the in-memory rows first and ask the database only for the
others. An advance of a chain is six statements and a commit (it was eleven).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from psycopg2_mq import JobStates, Model, MQSource

from ._queries import (
    COUNT_DOWN_ITEMS,
    COUNT_DOWN_WAITING,
    DELETE_STEP,
    FINISH_RUN,
    INSERT_STEPS,
    LOAD_FINISHED_JOBS,
    LOAD_ITEM_ROWS,
    LOAD_ITEMS,
    LOAD_OPEN_STEPS,
    LOAD_RESULTS,
    LOAD_STEPS,
    LOCK_RUN,
    SAVE_RUN,
    SAVE_STEPS,
    combine,
)
from .model import WorkflowModel
from .rules import RunStates, StepStates, should_run

#: the method of the coordinator queue that advances a run
ADVANCE_METHOD = "advance"
#: the key under which a step job's ``trace`` carries its workflow context
TRACE_KEY = "workflow"


def run_cursor_key(run_id: int) -> str:
    """The cursor of a run's coordinator jobs: they never overlap, bursts collapse."""
    return f"workflow-run:{run_id}"


def table_sql(table: sa.Table) -> str:
    return f'"{table.schema}"."{table.name}"' if table.schema else f'"{table.name}"'


def error_result(kind: str, message: str) -> dict[str, Any]:
    """An error result shaped like the queue's (``{"error": {type, message}}``)."""
    return {"error": {"type": kind, "message": message}}


# -- in-memory rows ---------------------------------------------------------------------


@dataclass
class RunRow:
    id: int
    workflow: str
    state: str
    args: dict[str, Any]
    coordinator_queue: str
    unfinished: int


class _Unread:
    """The type of :data:`UNREAD`."""

    def __repr__(self) -> str:
        return "UNREAD"


#: a step's ``result`` that was neither read nor set in this transaction: the
#: stored one stands (reads take it from the database, writes leave it alone)
UNREAD: Any = _Unread()


@dataclass
class StepRow:
    name: str
    parent: str | None
    item_index: int | None
    spec: dict[str, Any]
    state: str
    waiting_on: int
    items_left: int | None
    attempts: int
    job_id: int | None
    result: Any = UNREAD
    #: what to write back: set by the methods that change the row
    dirty: bool = False
    new: bool = False
    queued: bool = False
    finished: bool = False
    #: for a call being built: (call dict) until its job id is known
    call: dict[str, Any] | None = field(default=None, repr=False)


def lock_run(session: Session, wf: WorkflowModel, run_id: int) -> RunRow | None:
    row = session.execute(sa.text(LOCK_RUN.format(run=table_sql(wf.run_table))), {"run_id": run_id}).first()
    return None if row is None else RunRow(*row)


class RunAdvancer:
    """Changes the steps of one locked run; call :meth:`save` before committing."""

    def __init__(self, session: Session, model: Model, wf: WorkflowModel, run: RunRow) -> None:
        self.session = session
        self.model = model
        self.wf = wf
        self.run = run
        self.mq = MQSource(dbsession=session, model=model)
        self._names = {
            "run": table_sql(wf.run_table),
            "step": table_sql(wf.step_table),
            "job": table_sql(model.job_table),
            "trace_key": TRACE_KEY,
        }
        self._rows: dict[str, StepRow] = {}
        #: steps that became terminal and have not told their dependents yet
        self._finished: list[StepRow] = []
        #: steps whose calls are waiting for the batch insert of their jobs
        self._calls: list[StepRow] = []
        self.enqueued = 0
        self.run_changed = False

    # -- entry points ------------------------------------------------------------

    def finish_jobs(self, job_ids: list[int]) -> int:
        """Record the outcome of these finished jobs; returns how many steps changed."""
        if not job_ids:
            return 0
        # the jobs and their steps in one round trip
        params = {"run_id": self.run.id, "job_ids": job_ids}
        found = self.session.execute(self._sql(LOAD_FINISHED_JOBS), params).all()
        # a finished job without on_finish handed it to a copy (MQSource.retry_job
        # of a lost job): the copy's outcome is the step's, not this one's
        mine = [
            (j, j[5:])
            for j in found
            if j.job_state in JobStates.FINISHED
            and j.has_on_finish
            and j.name is not None
            and self._step_of(j.job_trace) == j.name
        ]
        changed = 0
        for j, columns in mine:
            (step,) = self._store([columns])
            if step.state != StepStates.QUEUED or step.job_id is None:
                continue  # already decided: a replayed advance, or a canceled run
            if j.job_key < step.job_id:
                continue  # an older attempt of the step
            if j.job_key > step.job_id:
                # MQSource.retry_job made a copy of the step's job (trace and
                # on_finish included): adopt it as the step's current attempt
                step.job_id = j.job_key
                step.attempts += 1
                step.dirty = True
            changed += 1
            if j.job_state == JobStates.COMPLETED:
                self.finish(step, StepStates.COMPLETED, j.job_result)
            elif j.job_state == JobStates.CANCELED:
                self.finish(step, StepStates.CANCELED, j.job_result)
            elif self.run.state == RunStates.RUNNING and step.attempts <= self._spec(step).get("retries", 0):
                self._retry_job(step, j.job_trace)
            else:
                self.finish(step, StepStates.FAILED, j.job_result)
        return changed

    def reconcile(self) -> int:
        """Re-read every open step of the run and its job: the recovery path, O(run).

        Used when an advance may have been lost (a coordinator job that was
        retried or failed after its worker died), never on the normal path.
        """
        rows = self._store(self.session.execute(self._sql(LOAD_OPEN_STEPS), {"run_id": self.run.id}).all())
        changed = self.finish_jobs([s.job_id for s in rows if s.state == StepStates.QUEUED and s.job_id])
        ready = [s.name for s in rows if s.state == StepStates.WAITING and s.waiting_on <= 0]
        self.decide(ready)
        return changed + len(ready)

    def cancel(self) -> None:
        """Cancel what has not started; running jobs finish, nothing new starts."""
        self.run.state = RunStates.CANCELING
        self.run_changed = True
        rows = self._store(self.session.execute(self._sql(LOAD_OPEN_STEPS), {"run_id": self.run.id}).all())
        for step in rows:
            # a queued step whose job could not be canceled is running: it finishes;
            # a mapped step (no job of its own) ends when its items do
            if step.state == StepStates.WAITING or (
                step.job_id is not None and self.mq.cancel_job(step.job_id)
            ):
                self.finish(step, StepStates.CANCELED, None)

    def decide(self, names: list[str]) -> None:
        """Decide steps whose upstream steps are all terminal (a no-op for others)."""
        if not names:
            return
        rows = self.load(names)
        ready = [rows[n] for n in names if n in rows and rows[n].state == StepStates.WAITING]
        upstream = self.load_results({u for s in ready for u in s.spec["after"]})
        for step in ready:
            spec = step.spec
            states = [upstream[u]["state"] for u in spec["after"]]
            if self.run.state != RunStates.RUNNING:
                self.finish(step, StepStates.CANCELED, None)
            elif not should_run(spec["trigger_rule"], states):
                self.finish(step, StepStates.SKIPPED, None)
            else:
                context = {u: upstream[u] for u in spec["after"]}
                if spec.get("map_over"):
                    self._expand(step, context)
                else:
                    self._enqueue(step, context)

    def propagate(self) -> None:
        """Run rounds until no step changes any more."""
        while self._finished or self._calls:
            self._flush_calls()
            batch, self._finished = self._finished, []
            if not batch:
                continue
            waiting: Counter[str] = Counter()
            items: Counter[str] = Counter()
            for step in batch:
                if step.parent is not None:
                    items[step.parent] += 1
                else:
                    self.run.unfinished -= 1
                    self.run_changed = True
                    waiting.update(step.spec.get("downstream", []))
            if items:
                for name in self._count_down(items, mapped=True):
                    self._finish_mapped(name)
            if waiting:
                self.decide(self._count_down(waiting, mapped=False))

    def save(self) -> None:
        """Propagate, write every change and finish the run if nothing is left."""
        self.propagate()
        if self.run.unfinished <= 0 and self.run.state in RunStates.ACTIVE:
            self.save_steps()
            self._finish_run()
        else:
            self.save_steps(with_run=self.run_changed)

    # -- step changes ----------------------------------------------------------------

    def finish(self, step: StepRow, state: str, result: Any) -> None:
        step.state = state
        step.result = result
        step.finished = True
        step.dirty = True
        self._finished.append(step)

    def reopen(self, step: StepRow, waiting_on: int) -> None:
        """Back to waiting (retry_step): neither terminal nor queued."""
        step.state = StepStates.WAITING
        step.result = None
        step.waiting_on = waiting_on
        step.dirty = True

    def requeue(self, step: StepRow, context: dict[str, Any] | None = None) -> None:
        """Call a terminal step's job again (retry_step)."""
        if step.parent is not None:
            parent = self.load([step.parent])[step.parent]
            self._call(step, self._item_trace(parent, step, context or {}))
        else:
            self._enqueue(step, context or {})

    def add_steps(self, steps: Iterable[StepRow]) -> None:
        """New step rows, inserted with the next write."""
        for step in steps:
            step.new = step.dirty = True
            self._rows[step.name] = step

    def load_items(self, parent: str) -> list[StepRow]:
        """The items of a mapped step, in order."""
        rows = self.session.execute(
            self._sql(LOAD_ITEM_ROWS), {"run_id": self.run.id, "parent": parent}
        ).all()
        return self._store(rows)

    def delete_step(self, step: StepRow) -> None:
        self.session.execute(self._sql(DELETE_STEP), {"run_id": self.run.id, "name": step.name})
        self._rows.pop(step.name, None)

    def load(self, names: list[str] | set[str]) -> dict[str, StepRow]:
        """The rows of these steps (cached for the transaction)."""
        missing = [n for n in set(names) if n not in self._rows]
        if missing:
            self._store(
                self.session.execute(self._sql(LOAD_STEPS), {"run_id": self.run.id, "names": missing}).all()
            )
        return {n: self._rows[n] for n in names if n in self._rows}

    def load_results(self, names: set[str]) -> dict[str, dict[str, Any]]:
        """``{name: {"state", "result"}}`` of terminal steps, as their dependents see them."""
        out: dict[str, dict[str, Any]] = {}
        missing = []
        for name in names:
            row = self._rows.get(name)
            if row is not None and row.result is not UNREAD:
                out[name] = {"state": row.state, "result": row.result}
            else:
                missing.append(name)
        if missing:
            params = {"run_id": self.run.id, "names": sorted(missing)}
            for name, state, result in self.session.execute(self._sql(LOAD_RESULTS), params):
                row = self._rows.get(name)  # its state may have changed in memory
                out[name] = {"state": state if row is None else row.state, "result": result}
        return out

    def save_steps(self, *, with_run: bool = False) -> None:
        """Write the changed steps (and with ``with_run`` the run's row) in one statement."""
        dirty = [s for s in self._rows.values() if s.dirty and s.call is None]
        new = [s for s in dirty if s.new]
        old = [s for s in dirty if not s.new]
        statements: list[str] = []
        params: dict[str, Any] = {"run_id": self.run.id}
        if new:
            rows = [
                {
                    "name": s.name,
                    "parent": s.parent,
                    "item_index": s.item_index,
                    "spec": s.spec,
                    "state": s.state,
                    "waiting_on": s.waiting_on,
                    "items_left": s.items_left,
                    "attempts": s.attempts,
                    "job_id": s.job_id,
                }
                for s in new
            ]
            statements.append(INSERT_STEPS)
            params["new_rows"] = _dumps(rows)
        if old:
            changes = {s.name: _changes(s) for s in old}
            statements.append(SAVE_STEPS)
            params.update(rows=_dumps(changes), names=list(changes))
        if with_run:
            statements.append(SAVE_RUN)
            params.update(state=self.run.state, unfinished=self.run.unfinished)
            self.run_changed = False
        if statements:
            self.session.execute(self._sql(combine(statements)), params)
        for s in dirty:
            # new rows that became terminal in this round are now plain rows
            s.dirty = s.new = s.queued = s.finished = False

    # -- internals -----------------------------------------------------------------------

    def _sql(self, sql: str) -> sa.TextClause:
        return sa.text(sql.format(**self._names))

    def _store(self, rows: Any) -> list[StepRow]:
        out = []
        for r in rows:
            step = self._rows.get(r[0])  # the name
            if step is None:
                step = StepRow(*r)
                self._rows[step.name] = step
            out.append(step)
        return out

    def _step_of(self, trace: Any) -> str | None:
        ctx = trace.get(TRACE_KEY) if isinstance(trace, dict) else None
        if not isinstance(ctx, dict) or ctx.get("run_id") != self.run.id:
            return None
        return ctx.get("item_step") or ctx.get("step")

    def _spec(self, step: StepRow) -> dict[str, Any]:
        """The step definition (an item's is its mapped step's)."""
        if step.parent is None:
            return step.spec
        return self.load([step.parent])[step.parent].spec

    def _count_down(self, counts: Counter[str], *, mapped: bool) -> list[str]:
        """Count down ``waiting_on`` (or a mapped step's ``items_left``); the steps that reach zero.

        Rows held in memory count down there (they are written at the end);
        the others in one UPDATE, which returns the whole rows that reach zero.
        Only steps still waiting (mapped steps still queued) count down, so a
        replayed advance, or a step canceled meanwhile, is left alone.
        """
        ready: list[str] = []
        uncached: dict[str, int] = {}
        for name, n in counts.items():
            row = self._rows.get(name)
            if row is None:
                uncached[name] = n
            elif mapped and row.state == StepStates.QUEUED and row.items_left is not None:
                row.items_left -= n
                row.dirty = True
                if row.items_left <= 0:
                    ready.append(name)
            elif not mapped and row.state == StepStates.WAITING:
                row.waiting_on -= n
                row.dirty = True
                if row.waiting_on <= 0:
                    ready.append(name)
        if uncached:
            params = {"run_id": self.run.id, "counts": _dumps(uncached), "names": list(uncached)}
            sql = COUNT_DOWN_ITEMS if mapped else COUNT_DOWN_WAITING
            for row in self.session.execute(self._sql(sql), params):
                if (row.items_left if mapped else row.waiting_on) <= 0:
                    self._store([row])
                    ready.append(row.name)
        return ready

    def _context(self, step: StepRow, upstream: dict[str, Any]) -> dict[str, Any]:
        return {
            "run_id": self.run.id,
            "workflow": self.run.workflow,
            "step": step.name,
            "run_args": self.run.args,
            "upstream": upstream,
        }

    def _item_trace(self, parent: StepRow, item: StepRow, upstream: dict[str, Any]) -> dict[str, Any]:
        context = self._context(parent, upstream)
        context.update(item_step=item.name, index=item.item_index, item=item.spec.get("item"))
        return {TRACE_KEY: context}

    def _enqueue(self, step: StepRow, upstream: dict[str, Any]) -> None:
        self._call(step, {TRACE_KEY: self._context(step, upstream)})

    def _retry_job(self, step: StepRow, trace: Any) -> None:
        """Call a failed job again with the same context, after the step's retry delay."""
        spec = self._spec(step)
        delay = float(spec.get("retry_delay") or 0) * 2 ** max(step.attempts - 1, 0)
        self._call(step, trace, when=timedelta(seconds=delay) if delay else None)

    def _call(self, step: StepRow, trace: Any, when: timedelta | None = None) -> None:
        spec = self._spec(step)
        cursor_key = spec.get("cursor_key")
        if cursor_key:
            cursor_key = cursor_key.format(**self.run.args)
        step.call = {
            "queue": spec["queue"],
            "method": spec["method"],
            "args": spec["args"],
            "when": when,
            "cursor_key": cursor_key or None,
            # never collapse a step onto another run's pending job of the same
            # entity: wait behind it instead (the cursor still serializes them)
            "collapse_on_cursor": not cursor_key,
            "trace": trace,
            "on_finish": {
                "queue": self.run.coordinator_queue,
                "method": ADVANCE_METHOD,
                "args": {"run_id": self.run.id},
                "cursor_key": run_cursor_key(self.run.id),
            },
        }
        step.state = StepStates.QUEUED
        step.result = None
        step.attempts += 1
        step.queued = True
        step.dirty = True
        self._rows.setdefault(step.name, step)
        self._calls.append(step)

    def _flush_calls(self) -> None:
        """Queue the jobs of this round in one statement and record their ids."""
        if not self._calls:
            return
        steps, self._calls = self._calls, []
        ids = self.mq.call_many([s.call for s in steps])  # type: ignore[misc]
        for step, job_id in zip(steps, ids, strict=True):
            step.job_id = job_id
            step.call = None
        self.enqueued += len(steps)

    def _expand(self, step: StepRow, upstream: dict[str, Any]) -> None:
        """A mapped step: one job per item of its ``map_over`` step's result."""
        spec = step.spec
        items = upstream[spec["map_over"]]["result"]
        if not isinstance(items, list):
            message = f"step {step.name!r} maps over {spec['map_over']!r}, whose result is not a list"
            self.finish(step, StepStates.FAILED, error_result("MapError", message))
            return
        if len(items) > spec["max_items"]:
            message = (
                f"step {step.name!r} maps over {len(items)} items of {spec['map_over']!r},"
                f" more than max_items={spec['max_items']}"
            )
            self.finish(step, StepStates.FAILED, error_result("MaxItemsExceeded", message))
            return
        if not items:
            self.finish(step, StepStates.COMPLETED, [])
            return
        step.state = StepStates.QUEUED
        step.result = None
        step.items_left = len(items)
        step.attempts += 1
        step.queued = True
        step.dirty = True
        for index, value in enumerate(items):
            item = StepRow(
                name=f"{step.name}[{index}]",
                parent=step.name,
                item_index=index,
                spec={"item": value},
                state=StepStates.WAITING,
                waiting_on=0,
                items_left=None,
                attempts=0,
                job_id=None,
                new=True,
            )
            self._rows[item.name] = item
            self._call(item, self._item_trace(step, item, upstream))

    def _finish_mapped(self, name: str) -> None:
        """All items of a mapped step are terminal: so is the step."""
        step = self.load([name])[name]
        if step.state != StepStates.QUEUED:
            return
        held = [s for s in self._rows.values() if s.parent == name]
        if any(s.new for s in held):
            self.save_steps()  # items not inserted yet (never on the normal path)
        items = self.session.execute(self._sql(LOAD_ITEMS), {"run_id": self.run.id, "parent": name}).all()
        # items held in memory (those finished by this advance) are newer than their rows
        memory = {s.name: s for s in held}
        states, results = [], []
        for row in items:
            item = memory.get(row.name)
            states.append(row.state if item is None else item.state)
            results.append(row.result if item is None or item.result is UNREAD else item.result)
        if set(states) <= {StepStates.COMPLETED}:
            state = StepStates.COMPLETED
        elif StepStates.FAILED in states:
            state = StepStates.FAILED
        else:
            state = StepStates.CANCELED
        self.finish(step, state, results)

    def _finish_run(self) -> None:
        """Every step is terminal (and saved): the run's outcome and result, and its NOTIFY."""
        params = {
            "run_id": self.run.id,
            "unfinished": self.run.unfinished,
            "canceling": self.run.state == RunStates.CANCELING,
            "channel": self.wf.run_channel(self.run.id),
        }
        self.run.state = self.session.execute(self._sql(FINISH_RUN), params).scalar_one()
        self.run_changed = False


def _changes(step: StepRow) -> dict[str, Any]:
    """A changed step as SAVE_STEPS takes it (without "result" if UNREAD: the stored one stays)."""
    out = {
        "state": step.state,
        "job_id": step.job_id,
        "attempts": step.attempts,
        "waiting_on": step.waiting_on,
        "items_left": step.items_left,
        "queued": step.queued,
        "finished": step.finished,
    }
    if step.result is not UNREAD:
        out["result"] = step.result
    return out


def _dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=False, separators=(",", ":"))
