"""``WorkflowSource``: start, inspect, wait for, cancel and retry runs.

Like ``MQSource`` it works in the caller's session and never commits: a run
(and its root jobs) exist when the caller commits. ``wait_for_run`` is the
exception that proves the rule: it waits on a connection of its own.
"""

from __future__ import annotations

import contextlib
import json
import select
import time
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from psycopg2_mq import InvalidJobStateError, Model, MQSource

from ._advance import ADVANCE_METHOD, RunAdvancer, StepRow, lock_run, run_cursor_key, table_sql
from .definition import Workflow
from .model import WorkflowModel
from .rules import RunStates, StepStates
from .status import RunStatus, RunSummary, StepStatus

#: the queue name under which ``WorkflowCoordinator`` is registered by default
DEFAULT_COORDINATOR_QUEUE = "workflows"


class RunNotFoundError(LookupError):
    """No run has the given id."""


class InvalidStepStateError(InvalidJobStateError):
    """The run or step is not in a state the operation accepts."""


class WorkflowSource:
    """Start and manage workflow runs within the caller's transaction.

    ``model`` is the queue's model, ``workflow_model`` the one of
    ``make_workflow_model``; ``coordinator_queue`` is the queue the
    ``WorkflowCoordinator`` is registered under in your workers.
    """

    def __init__(
        self,
        *,
        dbsession: Session,
        model: Model,
        workflow_model: WorkflowModel,
        coordinator_queue: str = DEFAULT_COORDINATOR_QUEUE,
    ) -> None:
        self.dbsession = dbsession
        self.model = model
        self.workflow_model = workflow_model
        self.coordinator_queue = coordinator_queue

    # -- starting ----------------------------------------------------------------

    def start(self, workflow: Workflow, args: dict[str, Any] | None = None, *, key: str | None = None) -> int:
        """Create a run of ``workflow`` and queue its root steps; return the run id.

        The run follows a snapshot of the definition taken now. With ``key``, a
        second start of the same workflow and key returns the first run's id
        and queues nothing.
        """
        args = {} if args is None else args
        if not isinstance(args, dict):
            raise TypeError("run args must be a dict")
        try:
            json.dumps(args, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"run args must be JSON: {exc}") from None
        snapshot = workflow.to_snapshot()
        steps = snapshot["steps"]
        for step in steps:
            if step["cursor_key"]:
                try:
                    step["cursor_key"].format(**args)
                except (KeyError, IndexError, ValueError) as exc:
                    raise ValueError(
                        f"step {step['name']!r}: cursor_key {step['cursor_key']!r} needs run arg {exc}"
                    ) from None
        run = self.workflow_model.run_table
        stmt = pg_insert(run).values(
            workflow=workflow.name,
            key=key,
            state=RunStates.RUNNING,
            args=args,
            definition=snapshot,
            coordinator_queue=self.coordinator_queue,
            unfinished=len(steps),
        )
        if key is not None:
            stmt = stmt.on_conflict_do_nothing(
                index_elements=["workflow", "key"], index_where=sa.text("key IS NOT NULL")
            )
        run_id = self.dbsession.execute(stmt.returning(run.c.id)).scalar()
        if run_id is None:
            # the key exists (or its first start committed while we waited on it)
            return int(
                self.dbsession.execute(
                    sa.select(run.c.id).where(run.c.workflow == workflow.name, run.c.key == key)
                ).scalar_one()
            )
        advancer = self._advancer(run_id)
        downstream: dict[str, list[str]] = {s["name"]: [] for s in steps}
        for step in steps:
            for dep in step["after"]:
                downstream[dep].append(step["name"])
        advancer.add_steps(
            StepRow(
                name=s["name"],
                parent=None,
                item_index=None,
                spec={**s, "downstream": downstream[s["name"]]},
                state=StepStates.WAITING,
                waiting_on=len(s["after"]),
                items_left=None,
                attempts=0,
                job_id=None,
            )
            for s in steps
        )
        advancer.decide([s["name"] for s in steps if not s["after"]])
        advancer.save()
        return int(run_id)

    # -- inspecting --------------------------------------------------------------

    def get_run(self, run_id: int) -> RunStatus:
        """The run and every step: state, attempts, timings, result or error."""
        run = self.workflow_model.run_table
        row = self.dbsession.execute(sa.select(run).where(run.c.id == run_id)).first()
        if row is None:
            raise RunNotFoundError(f"no workflow run with id {run_id}")
        step, job = self.workflow_model.step_table, self.model.job_table
        rows = self.dbsession.execute(
            sa.select(step, job.c.state.label("job_state"), job.c.start_time, job.c.end_time)
            .outerjoin(job, job.c.id == step.c.job_id)
            .where(step.c.run_id == run_id)
        ).all()
        specs = {s["name"]: s for s in row.definition["steps"]}
        order = {name: i for i, name in enumerate(specs)}
        rows = sorted(
            rows,
            key=lambda r: (order.get(r.parent or r.name, 0), r.item_index is not None, r.item_index or 0),
        )
        running_items: set[str] = set()
        item_starts: dict[str, list[Any]] = {}
        for r in rows:
            if r.parent is not None:
                if r.start_time is not None:
                    item_starts.setdefault(r.parent, []).append(r.start_time)
                if r.state == StepStates.QUEUED and r.job_state in ("running", "lost"):
                    running_items.add(r.parent)
        statuses = []
        for r in rows:
            state = r.state
            if state == StepStates.QUEUED and (r.job_state in ("running", "lost") or r.name in running_items):
                state = StepStates.RUNNING
            if r.job_id is not None:
                # the job's row may have been pruned since: wf_step keeps when it finished
                start = r.start_time
                end = (r.end_time or r.finished_time) if state in StepStates.TERMINAL else None
            else:  # a mapped step (its items' span) or a step that never ran
                start, end = min(item_starts.get(r.name, [None])), r.finished_time
            spec = specs.get(r.parent or r.name, {})
            failed = state == StepStates.FAILED
            statuses.append(
                StepStatus(
                    name=r.name,
                    state=state,
                    attempts=r.attempts,
                    job_id=r.job_id,
                    queued_time=r.queued_time,
                    start_time=start,
                    end_time=end,
                    result=None if failed else r.result,
                    error=_error_of(r.result) if failed else None,
                    after=[] if r.parent else list(spec.get("after", [])),
                    trigger_rule=None if r.parent else spec.get("trigger_rule"),
                    parent=r.parent,
                    index=r.item_index,
                )
            )
        return RunStatus(
            id=row.id,
            workflow=row.workflow,
            key=row.key,
            state=row.state,
            created_time=row.created_time,
            finished_time=row.finished_time,
            args=row.args,
            result=row.result,
            steps=statuses,
        )

    def list_runs(
        self,
        *,
        workflow: str | None = None,
        state: str | Iterable[str] | None = None,
        limit: int | None = 100,
    ) -> list[RunSummary]:
        """Runs matching the filters, newest first."""
        run = self.workflow_model.run_table
        query = sa.select(
            run.c.id, run.c.workflow, run.c.key, run.c.state, run.c.created_time, run.c.finished_time
        ).order_by(run.c.id.desc())
        if workflow is not None:
            query = query.where(run.c.workflow == workflow)
        if state is not None:
            states = [state] if isinstance(state, str) else list(state)
            unknown = set(states) - set(RunStates.ALL)
            if unknown:
                raise ValueError(f"unknown run states: {sorted(unknown)}")
            query = query.where(run.c.state.in_(states))
        if limit is not None:
            query = query.limit(limit)
        return [RunSummary(*r) for r in self.dbsession.execute(query)]

    def wait_for_run(self, run_id: int, timeout: float | None = None) -> RunStatus:
        """Block until the run is finished; return its status.

        Woken by the NOTIFY the coordinator sends when the run finishes (no
        polling); raises ``TimeoutError`` after ``timeout`` seconds. Commit the
        transaction that started the run first: it waits on its own connection.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        channel = self.workflow_model.run_channel(run_id)
        query = f"SELECT state FROM {table_sql(self.workflow_model.run_table)} WHERE id = %(run_id)s"
        bind = self.dbsession.get_bind()
        engine = bind.engine if isinstance(bind, sa.Connection) else bind
        proxied = engine.raw_connection()
        conn = proxied.driver_connection
        proxied.detach()  # it leaves the pool: autocommit and LISTEN must not leak into it
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'LISTEN "{channel}"')
            while True:
                # checked after LISTEN, so a run that finishes meanwhile still wakes us
                with conn.cursor() as cur:
                    cur.execute(query, {"run_id": run_id})
                    found = cur.fetchone()
                if found is None:
                    raise RunNotFoundError(f"no workflow run with id {run_id}")
                if found[0] in RunStates.TERMINAL:
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"workflow run {run_id} is still {found[0]} after {timeout}s")
                select.select([conn], [], [], remaining)
                conn.poll()
                conn.notifies.clear()
        finally:
            with contextlib.suppress(Exception):
                conn.close()
        return self.get_run(run_id)

    # -- managing ----------------------------------------------------------------

    def cancel_run(self, run_id: int) -> bool:
        """Cancel a run: queued steps are canceled, running ones finish, nothing new starts.

        The run is ``canceling`` until its running steps finish, then
        ``canceled``. ``False`` if it had already finished.
        """
        advancer = self._advancer(run_id)
        if advancer.run.state not in RunStates.ACTIVE:
            return False
        advancer.cancel()
        advancer.save()
        return True

    def retry_step(self, run_id: int, step: str, *, rerun_downstream: bool = False) -> None:
        """Re-run a failed (or canceled) step; its skipped dependents wait for it again.

        With ``rerun_downstream=True`` every finished step downstream runs
        again too (e.g. an ``all_done`` report that ran with the failure), like
        Airflow's "clear downstream". A finished run becomes ``running`` again.
        For a mapped step, only its failed items run again (all of it, if
        mapping itself failed).
        """
        advancer = self._advancer(run_id)
        run = advancer.run
        if run.state in (RunStates.CANCELING, RunStates.CANCELED):
            raise InvalidStepStateError(f"run {run_id} is {run.state}; its steps cannot be retried")
        target = advancer.load([step]).get(step)
        if target is None or target.parent is not None:
            raise InvalidStepStateError(f"run {run_id} has no step {step!r}")
        if target.state not in (StepStates.FAILED, StepStates.CANCELED):
            raise InvalidStepStateError(
                f"step {step!r} of run {run_id} is {target.state}, not failed or canceled"
            )
        # the steps downstream that were decided because of it wait for it again
        resettable = StepStates.TERMINAL if rerun_downstream else (StepStates.SKIPPED,)
        reset: dict[str, StepRow] = {}
        waiting: dict[str, StepRow] = {}
        frontier = [target]
        while frontier:
            below = advancer.load({d for s in frontier for d in s.spec["downstream"]})
            waiting.update((d.name, d) for d in below.values() if d.state == StepStates.WAITING)
            busy = [d.name for d in below.values() if rerun_downstream and d.state == StepStates.QUEUED]
            if busy:
                raise InvalidStepStateError(f"steps downstream of {step!r} are still running: {sorted(busy)}")
            frontier = [d for d in below.values() if d.state in resettable and d.name not in reset]
            reset.update((d.name, d) for d in frontier)
        for d in reset.values():
            for item in advancer.load_items(d.name):
                advancer.delete_step(item)
        reopened = {step, *reset}
        for d in reset.values():
            advancer.reopen(d, sum(u in reopened for u in d.spec["after"]))
        for d in waiting.values():
            # still waiting on something else: it must now wait for the re-run too
            d.waiting_on += sum(u in reopened for u in d.spec["after"])
            d.dirty = True
        run.unfinished += len(reopened)
        run.state = RunStates.RUNNING
        advancer.run_changed = True
        items = advancer.load_items(step)
        failed_items = [i for i in items if i.state in (StepStates.FAILED, StepStates.CANCELED)]
        if failed_items:
            upstream = advancer.load_results(set(target.spec["after"]))
            target.state = StepStates.QUEUED
            target.result = None
            target.items_left = len(failed_items)
            target.dirty = True
            for item in failed_items:
                advancer.requeue(item, upstream)
        else:
            for item in items:  # mapping itself failed: map again from scratch
                advancer.delete_step(item)
            advancer.reopen(target, 0)
            advancer.decide([step])
        advancer.save()

    def reconcile_run(self, run_id: int) -> None:
        """Queue a coordinator that re-reads every open step of the run (O(run)).

        For recovery after failing a lost coordinator job (``fail_lost_job``),
        whose advances would otherwise never be recorded; harmless otherwise.
        """
        advancer = self._advancer(run_id)

        def merge(pending: Any, request: Any) -> None:
            pending.args = {**pending.args, "reconcile": True}

        MQSource(dbsession=self.dbsession, model=self.model).call(
            advancer.run.coordinator_queue,
            ADVANCE_METHOD,
            {"run_id": run_id, "reconcile": True},
            cursor_key=run_cursor_key(run_id),
            conflict_resolver=merge,
        )

    # -- internals ---------------------------------------------------------------

    def _advancer(self, run_id: int) -> RunAdvancer:
        run = lock_run(self.dbsession, self.workflow_model, run_id)
        if run is None:
            raise RunNotFoundError(f"no workflow run with id {run_id}")
        return RunAdvancer(self.dbsession, self.model, self.workflow_model, run)


def _error_of(result: Any) -> Any:
    if isinstance(result, dict) and "error" in result:
        return result["error"]
    return result
