"""``WorkflowCoordinator``: the queue object whose jobs advance runs.

Register it in a worker like any queue::

    worker = MQWorker(engine=engine, model=model, queues={
        "workflows": WorkflowCoordinator(engine=engine, model=model, workflow_model=wf_model),
        "etl": Etl(),
    })

Nothing calls it directly. Every step job carries an ``on_finish`` call of
``workflows.advance({"run_id": ...})`` with ``cursor_key="workflow-run:<id>"``;
the queue's trigger enqueues it in the very transaction that finishes the job
(completion, failure, cancel, failing a lost job) and collapses a burst of
them into one pending job; ``MQSource.take_finished_jobs`` then returns every
step job that finished meanwhile. The cursor guarantees that two coordinators of one
run never run at once.

An advance opens its own transaction, locks the run's row, records the
outcome of the finished jobs, decides the steps that became ready, enqueues
them and commits; it returns a small summary that becomes the coordinator
job's result. It is idempotent: replaying it (a lost coordinator retried)
finds the steps already decided and changes nothing.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from psycopg2_mq import Job, Model, MQSource

from ._advance import ADVANCE_METHOD, RunAdvancer, lock_run, run_cursor_key
from .model import WorkflowModel
from .rules import RunStates

log = logging.getLogger("workflows.coordinator")


class WorkflowCoordinator:
    """Advances workflow runs; register it under the coordinator queue (``"workflows"``).

    ``engine`` is where its transactions run (the database of ``model`` and
    ``workflow_model``).
    """

    def __init__(self, *, engine: sa.Engine, model: Model, workflow_model: WorkflowModel) -> None:
        self.engine = engine
        self.model = model
        self.workflow_model = workflow_model

    def execute_job(self, job: Job) -> dict[str, Any]:
        if job.method != ADVANCE_METHOD:
            raise ValueError(f"the workflow coordinator has no method {job.method!r}")
        args = job.args if isinstance(job.args, dict) else {}
        return self.advance(
            int(args["run_id"]),
            [int(i) for i in args.get("finished_jobs", [])],
            # a retried coordinator (its worker died) may stand for advances
            # that were never recorded: look at the whole run once
            reconcile=bool(args.get("reconcile")) or job.attempt > 1 or _is_retry(job.trace),
        )

    def advance(self, run_id: int, finished_jobs: list[int], *, reconcile: bool = False) -> dict[str, Any]:
        """Record ``finished_jobs`` of run ``run_id`` and move it on; commits."""
        with Session(self.engine) as session, session.begin():
            run = lock_run(session, self.workflow_model, run_id)
            if run is None:
                return {"run_id": run_id, "missing": True}
            if run.state not in RunStates.ACTIVE:
                return {"run_id": run_id, "state": run.state, "changed": 0, "enqueued": 0}
            advancer = RunAdvancer(session, self.model, self.workflow_model, run)
            # collapsed callbacks: every step job that finished since the last advance
            recorded = MQSource(dbsession=session, model=self.model).take_finished_jobs(
                run_cursor_key(run_id)
            )
            changed = advancer.finish_jobs(sorted(set(finished_jobs) | set(recorded)))
            if reconcile:
                changed += advancer.reconcile()
            advancer.save()
            summary = {
                "run_id": run_id,
                "state": run.state,
                "changed": changed,
                "enqueued": advancer.enqueued,
            }
        log.debug("advanced run %s: %s", run_id, summary)
        return summary


def _is_retry(trace: Any) -> bool:
    return isinstance(trace, dict) and trace.get("retry_of") is not None
