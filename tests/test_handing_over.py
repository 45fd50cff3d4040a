"""Handing a cursor over: the completer finishes a cursor's job and claims the next one.

``FINISH_JOB_HANDING_OVER`` (see ``_queries``) takes the cursor's next job in
the transaction that finishes the previous one, when it is this worker's to
run now. These tests check that the rules of an ordinary claim still hold on
that path: the cursor's head only, due only, of the worker's queues only, the
cursor's data as the previous job left it, never while stopping, and never
mistaken by maintenance for a job the worker lost track of.
"""

from __future__ import annotations

import itertools
import threading
import time
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from psycopg2_mq import JobStates, MQWorker

from .support import RecordingQueue, enqueue, job_states, running_worker, wait_until

NO_POLLING: dict[str, Any] = {"poll_interval": 3600, "maintenance_interval": 3600}


def bump(job: Any) -> dict[str, Any]:
    """Count on the cursor; return what the job saw."""
    seen = job.cursor.get("n", 0)
    job.cursor["n"] = seen + 1
    return {"seen": seen, "i": job.args["i"]}


def _results(engine: sa.Engine, model: Any, ids: list[int]) -> dict[int, Any]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(model.Job.id, model.Job.state, model.Job.result).where(model.Job.id.in_(ids))
        ).all()
    return {row.id: (row.state, row.result) for row in rows}


def _chain(engine: sa.Engine, model: Any, n: int, queue: str = "q", key: str = "k") -> list[int]:
    return enqueue(
        engine, model, *((queue, "m", {"i": i}) for i in range(n)), cursor_key=key, collapse_on_cursor=False
    )


def test_a_cursor_chain_is_handed_over_in_order_with_the_cursor_data(engine, model):
    ids = _chain(engine, model, 30)
    queue = RecordingQueue(bump)
    with running_worker(engine, model, {"q": queue}, threads=2, **NO_POLLING) as worker:
        wait_until(lambda: len(queue.ids()) == 30)
        wait_until(lambda: set(job_states(engine, model).values()) == {JobStates.COMPLETED})
        handed_over = worker.get_status()["handed_over_jobs"]
    assert queue.ids() == ids  # in turn, each exactly once
    results = _results(engine, model, ids)
    assert [results[i][1] for i in ids] == [{"seen": n, "i": n} for n in range(30)]
    # the first job is claimed by the dispatcher; with polling off, the rest could only
    # have started promptly through a NOTIFY or a hand-over: here they are handed over
    assert handed_over >= 25
    executions = sorted(queue.executions, key=lambda r: r["start"])
    assert all(a["end"] <= b["start"] for a, b in itertools.pairwise(executions))


def test_the_head_of_a_cursor_in_a_queue_the_worker_does_not_serve_is_not_handed_over(engine, model):
    first, second = enqueue(
        engine, model, ("a", "m", {"i": 0}), cursor_key="k", collapse_on_cursor=False
    ) + enqueue(engine, model, ("b", "m", {"i": 1}), cursor_key="k", collapse_on_cursor=False)
    (third,) = enqueue(engine, model, ("a", "m", {"i": 2}), cursor_key="k", collapse_on_cursor=False)
    queue_a, queue_b = RecordingQueue(bump), RecordingQueue(bump)
    with running_worker(engine, model, {"a": queue_a}, **NO_POLLING) as worker_a:
        wait_until(lambda: queue_a.ids() == [first])
        time.sleep(0.3)  # a wrong hand-over of the third job would happen now
        assert queue_a.ids() == [first]
        assert _results(engine, model, [third])[third][0] == JobStates.PENDING
        with running_worker(engine, model, {"b": queue_b}, **NO_POLLING):
            wait_until(lambda: queue_a.ids() == [first, third])
        assert worker_a.get_status()["handed_over_jobs"] == 0
    assert queue_b.ids() == [second]
    results = _results(engine, model, [first, second, third])
    assert [results[i][1]["seen"] for i in (first, second, third)] == [0, 1, 2]


def test_a_head_that_is_not_due_is_not_handed_over(engine, model):
    (first,) = enqueue(engine, model, ("q", "m", {"i": 0}), cursor_key="k", collapse_on_cursor=False)
    (later,) = enqueue(
        engine,
        model,
        ("q", "m", {"i": 1}),
        cursor_key="k",
        collapse_on_cursor=False,
        when=timedelta(seconds=1.5),
    )
    queue = RecordingQueue(bump)
    with running_worker(engine, model, {"q": queue}) as worker:
        wait_until(lambda: queue.ids() == [first, later])
        assert worker.get_status()["handed_over_jobs"] == 0
    with engine.connect() as conn:
        start, due = conn.execute(
            sa.select(model.Job.start_time, model.Job.scheduled_time).where(model.Job.id == later)
        ).one()
    assert start >= due


def test_nothing_is_handed_over_once_the_worker_is_stopping(engine, model):
    ids = _chain(engine, model, 20)
    stop_at = threading.Event()

    def slow_bump(job: Any) -> dict[str, Any]:
        if job.args["i"] == 5:
            stop_at.set()
            time.sleep(0.2)  # shutdown is requested while this job runs
        return bump(job)

    queue = RecordingQueue(slow_bump)
    with running_worker(engine, model, {"q": queue}, **NO_POLLING) as worker:
        stop_at.wait(30)
        worker.shutdown_gracefully()
    states = job_states(engine, model)
    ran = queue.ids()
    assert ran == ids[: len(ran)] and len(ran) == 6
    # nothing was taken that would not run: every job ran and completed, or is still pending
    assert [states[i] for i in ids] == [JobStates.COMPLETED] * 6 + [JobStates.PENDING] * 14


def test_maintenance_never_takes_a_handed_over_job_for_an_orphan(engine, model):
    """Maintenance releases running jobs the worker does not hold; a hand-over
    claims one outside the dispatcher. Here maintenance runs all the time."""
    ids = _chain(engine, model, 150)
    queue = RecordingQueue(bump)
    with running_worker(
        engine, model, {"q": queue}, maintenance_interval=0.001, poll_interval=3600
    ) as worker:
        wait_until(lambda: len(queue.ids()) == 150)
        wait_until(lambda: set(job_states(engine, model).values()) == {JobStates.COMPLETED})
        assert worker.get_status()["handed_over_jobs"] > 0
    assert queue.ids() == ids
    with engine.connect() as conn:
        errors = conn.execute(sa.select(model.Job.id).where(model.Job.errors.is_not(None))).all()
    assert errors == []


def test_nothing_is_handed_over_while_the_dispatcher_is_disconnected(engine, model):
    """Its liveness lock may be gone; jobs claimed then would be released as a dead worker's."""
    worker = MQWorker(engine=engine, model=model, queues={"q": RecordingQueue()})
    worker.worker_id = 1

    class Connection:
        closed = 0

    worker._conn = Connection()
    assert worker._handing_over() is not None
    worker._conn.closed = 2  # psycopg2: closed by a failure
    assert worker._handing_over() is None
    worker._conn = None  # as _disconnect leaves it
    assert worker._handing_over() is None
