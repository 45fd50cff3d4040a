"""MQWorker: claiming, scheduling, wake-ups, cursors, failures, shutdown, signals, fencing, liveness.

Waiting uses ``wait_until`` with a generous timeout; nothing asserts speed.
"Does not happen" is shown with a sentinel job queued after the job that must
not run: once the sentinel has completed, the worker has had its chance.
Wake-up tests use ``poll_interval=3600`` (and ``maintenance_interval=3600``)
so that only the mechanism under test can wake the worker in time.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from psycopg2_mq import FailedJobError, JobStates, MQSource, MQWorker

from .support import PATIENCE, RecordingQueue, enqueue, fetch_job, running_worker, wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent
ODD_QUEUE = 'we\'ird "queue" ñ ✉ with spaces'
#: keyword arguments that leave NOTIFY (or the next ``when``) as the only timely wake-up
NO_POLLING: dict[str, Any] = {"poll_interval": 3600, "maintenance_interval": 3600}


# -- helpers -------------------------------------------------------------------------------------


class GateQueue:
    """A queue whose jobs block until their gate (``args['gate']``) opens; records starts and contexts."""

    def __init__(self, behaviour: Callable[[Any], Any] | None = None) -> None:
        self.behaviour = behaviour
        self.lock = threading.Lock()
        self.gates: dict[str, threading.Event] = {}
        self.started: list[int] = []
        self.contexts: dict[int, dict[str, Any]] = {}
        self.active: dict[str, int] = {}  # cursor_key -> jobs running now
        self.max_active: dict[str, int] = {}

    def gate(self, name: str) -> threading.Event:
        with self.lock:
            return self.gates.setdefault(name, threading.Event())

    def open_all(self) -> None:
        with self.lock:
            gates = list(self.gates.values())
        for gate in gates:
            gate.set()

    def has_started(self, job_id: int) -> bool:
        with self.lock:
            return job_id in self.started

    def execute_job(self, job: Any) -> Any:
        key = job.cursor_key or ""
        with self.lock:
            self.started.append(job.id)
            self.contexts[job.id] = {
                "cursor": copy.deepcopy(job.cursor),
                "args": copy.deepcopy(job.args),
                "attempt": job.attempt,
            }
            self.active[key] = self.active.get(key, 0) + 1
            self.max_active[key] = max(self.max_active.get(key, 0), self.active[key])
        try:
            name = job.args.get("gate") if isinstance(job.args, dict) else None
            if name is not None and not self.gate(name).wait(PATIENCE):
                raise TimeoutError(f"gate {name!r} never opened")
            return self.behaviour(job) if self.behaviour else {"done": job.id}
        finally:
            with self.lock:
                self.active[key] -= 1


@contextlib.contextmanager
def gates_opened_on_exit(*queues: GateQueue) -> Iterator[None]:
    """Open every gate when the block ends, so a failing test never hangs a worker's shutdown."""
    try:
        yield
    finally:
        for queue in queues:
            queue.open_all()


def state_of(engine: sa.Engine, model: Any, job_id: int) -> str:
    return fetch_job(engine, model, job_id).state


def wait_for_state(engine: sa.Engine, model: Any, job_id: int, state: str) -> Any:
    wait_until(lambda: state_of(engine, model, job_id) == state)
    return fetch_job(engine, model, job_id)


def get_cursor(engine: sa.Engine, model: Any, key: str) -> Any:
    with Session(engine) as session:
        return MQSource(dbsession=session, model=model).get_cursor(key)


def enqueue_together(
    engine: sa.Engine, model: Any, *calls: tuple[tuple[Any, ...], dict[str, Any]]
) -> list[int]:
    """Queue ``(call, options)`` pairs in one committed transaction.

    One commit means one wake-up, which keeps these tests clear of the
    lost-wake-up race shown by ``test_notify_read_during_a_statement_still_wakes_the_worker``.
    """
    with Session(engine) as session, session.begin():
        mq = MQSource(dbsession=session, model=model)
        return [mq.call(*call, **options).id for call, options in calls]


def sql(engine: sa.Engine, statement: str, **params: Any) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(statement), params)


# -- claiming ---------------------------------------------------------------------------------------


def test_claims_only_its_own_queues(engine, model):
    queue = RecordingQueue()
    with running_worker(engine, model, {"mine": queue, "also.mine": queue}) as worker:
        other_id, *mine = enqueue(
            engine, model, ("other", "m", {}), ("mine", "a", {}), ("also.mine", "b", {}), ("mine", "c", {})
        )
        for job_id in mine:
            wait_for_state(engine, model, job_id, JobStates.COMPLETED)
        assert all(fetch_job(engine, model, i).worker_id == worker.worker_id for i in mine)
    assert state_of(engine, model, other_id) == JobStates.PENDING
    assert sorted(queue.ids()) == sorted(mine)


def test_threads_run_jobs_concurrently(engine, model):
    queue = GateQueue()
    with running_worker(engine, model, {"q": queue}, threads=4), gates_opened_on_exit(queue):
        ids = enqueue(engine, model, *[("q", "m", {"gate": "all"}) for _ in range(4)])
        # all four are running at once, none of them finished
        wait_until(lambda: all(queue.has_started(i) for i in ids))
        assert {state_of(engine, model, i) for i in ids} == {JobStates.RUNNING}
        queue.gate("all").set()
        jobs = [wait_for_state(engine, model, i, JobStates.COMPLETED) for i in ids]
    assert max(j.start_time for j in jobs) <= min(j.end_time for j in jobs)


# -- when -----------------------------------------------------------------------------------------------


def test_never_starts_before_when_and_wakes_by_itself(engine, model, wait_idle):
    """Jobs due soon run once due, with no NOTIFY at that time and polling an hour away."""
    queue = RecordingQueue()
    with running_worker(engine, model, {"q": queue}, threads=2, **NO_POLLING):
        wait_idle()
        # a naive datetime is UTC; the client clock is only used to compute it here
        naive = datetime.now(timezone.utc).replace(tzinfo=None) + timedelta(seconds=1)
        ids = enqueue_together(
            engine,
            model,
            (("q", "now", {}), {}),
            *[(("q", "later", {"delay": d}), {"when": timedelta(seconds=d)}) for d in (0.3, 0.8, 1.2)],
            (("q", "naive", {}), {"when": naive}),
        )
        jobs = [wait_for_state(engine, model, i, JobStates.COMPLETED) for i in ids]
    for job in jobs:
        assert job.start_time >= job.scheduled_time, job
    assert sorted(queue.ids()) == sorted(ids)


# -- LISTEN/NOTIFY --------------------------------------------------------------------------------------


@pytest.mark.parametrize("queue_name", ["Mail.Outbox", ODD_QUEUE])
def test_notify_wakes_an_idle_worker(engine, model, queue_name, wait_idle):
    queue = RecordingQueue()
    with running_worker(engine, model, {queue_name: queue}, **NO_POLLING):
        wait_idle()  # the dispatcher sleeps for an hour unless woken
        (job_id,) = enqueue(engine, model, (queue_name, "send", {"to": "x@example.com"}))
        job = wait_for_state(engine, model, job_id, JobStates.COMPLETED)
    assert job.result == {"echo": {"to": "x@example.com"}}


def test_notify_read_during_a_statement_still_wakes_the_worker(engine, model, monkeypatch):
    """A NOTIFY already buffered by psycopg2 when the dispatcher goes to sleep must not be lost.

    The race happens for real when a job is committed while the dispatcher is running a
    statement (seen as a 30 s stall of a test queueing two jobs back to back); here it is
    made deterministic: just before the dispatcher's first wait, a job is committed and the
    dispatcher's connection runs a statement that reads the NOTIFY, as the claim would.
    """
    from psycopg2_mq import _notify

    real_wait = _notify.wait
    injected: list[int] = []

    def wait_after_a_buffered_notify(conn: Any, waker: Any, timeout: float | None) -> bool:
        if not injected:
            injected.extend(enqueue(engine, model, ("q", "due", {})))
            deadline = time.monotonic() + PATIENCE
            while not conn.notifies and time.monotonic() < deadline:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
                time.sleep(0.01)
            assert conn.notifies, "the NOTIFY never reached the dispatcher's connection"
        return real_wait(conn, waker, timeout)

    monkeypatch.setattr(_notify, "wait", wait_after_a_buffered_notify)
    with running_worker(engine, model, {"q": RecordingQueue()}, **NO_POLLING):
        wait_until(lambda: bool(injected))
        # generous for a due job on an idle worker; short of the hour the worker would sleep
        wait_until(lambda: state_of(engine, model, injected[0]) == JobStates.COMPLETED, timeout=10)


# -- cursors ----------------------------------------------------------------------------------------------


def cursor_behaviour(job: Any) -> Any:
    """Bump ``cursor['n']``; the method says how the job ends."""
    if job.cursor is not None:
        job.cursor["n"] = job.cursor.get("n", 0) + 1
        job.cursor.setdefault("by", []).append(job.method)
    if job.method == "raise":
        raise RuntimeError("boom")
    if job.method == "fail_keep":
        raise FailedJobError({"partial": True}, update_cursor=True)
    if job.method == "fail":
        raise FailedJobError({"partial": False})
    return {"seen": job.cursor}


def test_cursor_is_shared_state_saved_only_on_success(engine, model):
    queue = GateQueue(cursor_behaviour)
    steps = [
        ("ok", JobStates.COMPLETED, {"n": 1, "by": ["ok"]}),
        ("raise", JobStates.FAILED, {"n": 1, "by": ["ok"]}),  # exception: changes dropped
        ("fail", JobStates.FAILED, {"n": 1, "by": ["ok"]}),  # FailedJobError(result): dropped
        ("fail_keep", JobStates.FAILED, {"n": 2, "by": ["ok", "fail_keep"]}),  # update_cursor=True: saved
        ("ok", JobStates.COMPLETED, {"n": 3, "by": ["ok", "fail_keep", "ok"]}),
    ]
    with running_worker(engine, model, {"q": queue}):
        (plain_id,) = enqueue(engine, model, ("q", "ok", {}))
        wait_for_state(engine, model, plain_id, JobStates.COMPLETED)
        assert queue.contexts[plain_id]["cursor"] is None  # no cursor_key, no cursor
        assert get_cursor(engine, model, "acct") is None
        seen = []
        for method, state, saved in steps:
            (job_id,) = enqueue(engine, model, ("q", method, {}), cursor_key="acct")
            job = wait_for_state(engine, model, job_id, state)
            seen.append(queue.contexts[job_id]["cursor"])
            assert get_cursor(engine, model, "acct") == saved, method
            if method == "fail_keep":
                assert job.result == {"partial": True}
            elif method == "fail":
                assert job.result == {"partial": False}
            elif method == "raise":
                assert job.result["error"]["message"] == "boom"
    assert seen[0] == {}  # a new cursor starts empty
    assert seen[1] == {"n": 1, "by": ["ok"]}


def test_pending_job_waits_for_the_running_job_on_its_cursor(engine, model, wait_idle):
    queue = GateQueue()
    with running_worker(engine, model, {"q": queue}, threads=4, **NO_POLLING), gates_opened_on_exit(queue):
        (first,) = enqueue(engine, model, ("q", "first", {"gate": "first"}), cursor_key="c")
        wait_until(lambda: queue.has_started(first))
        wait_idle()
        second, sentinel = enqueue_together(
            engine, model, (("q", "second", {}), {"cursor_key": "c"}), (("q", "sentinel", {}), {})
        )
        wait_for_state(engine, model, sentinel, JobStates.COMPLETED)
        assert state_of(engine, model, second) == JobStates.PENDING
        assert not queue.has_started(second)
        queue.gate("first").set()
        done = wait_for_state(engine, model, second, JobStates.COMPLETED)
    assert done.start_time >= fetch_job(engine, model, first).end_time


def test_freed_cursor_notifies_the_worker_of_the_waiting_job(engine, model, wait_idle):
    """Worker B waits for a job on a cursor that worker A's job holds; A finishing wakes B by NOTIFY."""
    queue_a, queue_b = GateQueue(), GateQueue()
    with (
        running_worker(engine, model, {"qa": queue_a}, name="A"),
        running_worker(engine, model, {"qb": queue_b}, name="B", **NO_POLLING),
        gates_opened_on_exit(queue_a),
    ):
        (holder,) = enqueue(engine, model, ("qa", "hold", {"gate": "hold"}), cursor_key="shared")
        wait_until(lambda: queue_a.has_started(holder))
        wait_idle(2)
        waiter, sentinel = enqueue_together(
            engine, model, (("qb", "wait", {}), {"cursor_key": "shared"}), (("qb", "sentinel", {}), {})
        )
        wait_for_state(engine, model, sentinel, JobStates.COMPLETED)
        assert state_of(engine, model, waiter) == JobStates.PENDING
        wait_idle(2)
        queue_a.gate("hold").set()
        wait_for_state(engine, model, waiter, JobStates.COMPLETED)


def test_non_collapsible_jobs_on_one_cursor_never_overlap(engine, model):
    def slow(job: Any) -> Any:
        time.sleep(0.05)  # widen the window in which an overlap would show
        return None

    queue = GateQueue(slow)
    with running_worker(engine, model, {"q": queue}, threads=4):
        ids = enqueue(
            engine, model, *[("q", "m", {"i": i}) for i in range(4)], cursor_key="c", collapse_on_cursor=False
        )
        jobs = [wait_for_state(engine, model, i, JobStates.COMPLETED) for i in ids]
    assert queue.max_active["c"] == 1
    ordered = sorted(jobs, key=lambda j: j.start_time)
    for before, after in zip(ordered, ordered[1:], strict=False):
        assert after.start_time >= before.end_time


# -- failures ---------------------------------------------------------------------------------------------


class Unserializable:
    pass


def failing_behaviour(job: Any) -> Any:
    if job.method == "raise":
        raise ValueError("boom")
    if job.method == "set":
        return {1, 2}
    if job.method == "object":
        return {"x": Unserializable()}
    if job.method == "nan":
        return float("nan")
    if job.method == "nul_message":
        raise RuntimeError("bad\x00byte")
    if job.method == "nul_result":
        return {"text": "bad\x00byte"}
    return "fine"


def test_exception_is_stored_as_a_structured_error(engine, model):
    with running_worker(engine, model, {"q": RecordingQueue(failing_behaviour)}, threads=1) as worker:
        ids = enqueue(engine, model, ("q", "raise", {}), ("q", "ok", {}))
        failed = wait_for_state(engine, model, ids[0], JobStates.FAILED)
        wait_for_state(engine, model, ids[1], JobStates.COMPLETED)  # the worker carried on
        assert worker.get_status()["failed_jobs"] == 1
    error = failed.result["error"]
    assert set(error) >= {"type", "message", "traceback"}
    assert error["type"] == "builtins.ValueError"
    assert error["message"] == "boom"
    assert "ValueError: boom" in error["traceback"]
    assert "failing_behaviour" in error["traceback"]
    assert failed.end_time is not None


@pytest.mark.parametrize("method", ["set", "object", "nan"])
def test_non_json_result_fails_the_job_and_the_worker_carries_on(engine, model, method):
    with running_worker(engine, model, {"q": RecordingQueue(failing_behaviour)}, threads=1):
        ids = enqueue(engine, model, ("q", method, {}), ("q", "ok", {}))
        failed = wait_for_state(engine, model, ids[0], JobStates.FAILED)
        assert wait_for_state(engine, model, ids[1], JobStates.COMPLETED).result == "fine"
    error = failed.result["error"]
    assert "JSON" in error["message"]
    assert set(error) >= {"type", "message", "traceback"}


def test_nul_characters_are_scrubbed_or_refused_cleanly(engine, model):
    """jsonb cannot hold NUL: an exception message is stored scrubbed; a result with NUL fails clearly."""
    with running_worker(engine, model, {"q": RecordingQueue(failing_behaviour)}, threads=1):
        ids = enqueue(engine, model, ("q", "nul_message", {}), ("q", "nul_result", {}), ("q", "ok", {}))
        message_job = wait_for_state(engine, model, ids[0], JobStates.FAILED)
        result_job = wait_for_state(engine, model, ids[1], JobStates.FAILED)
        wait_for_state(engine, model, ids[2], JobStates.COMPLETED)
    assert message_job.result["error"]["type"] == "builtins.RuntimeError"
    assert message_job.result["error"]["message"] == "bad\\x00byte"
    assert "\x00" not in message_job.result["error"]["traceback"]
    assert "NUL" in result_job.result["error"]["message"]


def test_exception_with_lone_surrogate_keeps_its_type(engine, model):
    def behaviour(job: Any) -> Any:
        raise ValueError("bad \ud800 text")

    with running_worker(engine, model, {"q": RecordingQueue(behaviour)}):
        (job_id,) = enqueue(engine, model, ("q", "m", {}))
        failed = wait_for_state(engine, model, job_id, JobStates.FAILED)
    assert failed.result["error"]["type"] == "builtins.ValueError"


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("cannot describe myself")


def test_exception_that_cannot_be_printed_still_fails_the_job(engine, model):
    def behaviour(job: Any) -> Any:
        if job.method == "unprintable":
            raise UnprintableError()
        return "fine"

    with running_worker(engine, model, {"q": RecordingQueue(behaviour)}, threads=1):
        ids = enqueue(engine, model, ("q", "unprintable", {}), ("q", "ok", {}))
        # one thread runs them in order: once the second completed, the first's outcome was written
        wait_for_state(engine, model, ids[1], JobStates.COMPLETED)
    assert state_of(engine, model, ids[0]) == JobStates.FAILED


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_system_exit_in_a_job_fails_it_and_the_worker_carries_on(engine, model):
    def behaviour(job: Any) -> Any:
        if job.method == "exit":
            raise SystemExit(3)
        return "fine"

    name = "sysexit-worker"

    def executor_alive() -> bool:
        return any(t.name == f"{name}-exec-0" and t.is_alive() for t in threading.enumerate())

    with running_worker(engine, model, {"q": RecordingQueue(behaviour)}, threads=1, name=name):
        (exit_id,) = enqueue(engine, model, ("q", "exit", {}))
        wait_until(lambda: state_of(engine, model, exit_id) in JobStates.FINISHED or not executor_alive())
        assert state_of(engine, model, exit_id) == JobStates.FAILED
        (ok_id,) = enqueue(engine, model, ("q", "ok", {}))
        wait_for_state(engine, model, ok_id, JobStates.COMPLETED)


# -- the job context -----------------------------------------------------------------------------------------


def test_job_context(engine, model):
    seen: dict[str, Any] = {}

    def behaviour(job: Any) -> Any:
        job.extend(mailer="smtp", retries=3)
        seen.update(
            id=job.id,
            queue=job.queue,
            method=job.method,
            args=job.args,
            cursor=copy.deepcopy(job.cursor),
            cursor_key=job.cursor_key,
            trace=job.trace,
            attempt=job.attempt,
            extended=(job.mailer, job.retries),
        )
        return "ok"

    with running_worker(engine, model, {"Mail.Outbox": RecordingQueue(behaviour)}):
        (job_id,) = enqueue(
            engine,
            model,
            ("Mail.Outbox", "send", {"to": ["a", "b"]}),
            cursor_key="acct-9",
            trace={"by": "test"},
        )
        wait_for_state(engine, model, job_id, JobStates.COMPLETED)
    assert seen == {
        "id": job_id,
        "queue": "Mail.Outbox",
        "method": "send",
        "args": {"to": ["a", "b"]},
        "cursor": {},
        "cursor_key": "acct-9",
        "trace": {"by": "test"},
        "attempt": 1,
        "extended": ("smtp", 3),
    }


# -- status, shutdown, construction ----------------------------------------------------------------------------


def test_get_status(engine, model):
    queue = GateQueue(failing_behaviour)
    with (
        running_worker(engine, model, {"q": queue, "r": queue}, threads=3, name="status-worker") as worker,
        gates_opened_on_exit(queue),
    ):
        (blocked,) = enqueue(engine, model, ("q", "ok", {"gate": "g"}))
        wait_until(lambda: queue.has_started(blocked))
        status = worker.get_status()
        assert status["name"] == "status-worker"
        assert status["worker_id"] == worker.worker_id and isinstance(worker.worker_id, int)
        assert status["state"] == "running"
        assert status["queues"] == ["q", "r"]
        assert status["threads"] == 3
        assert status["running_jobs"] == [blocked]
        assert (status["completed_jobs"], status["failed_jobs"]) == (0, 0)
        queue.gate("g").set()
        wait_for_state(engine, model, blocked, JobStates.COMPLETED)
        (failing,) = enqueue(engine, model, ("r", "raise", {}))
        wait_for_state(engine, model, failing, JobStates.FAILED)
        wait_until(lambda: worker.get_status()["failed_jobs"] == 1)
        status = worker.get_status()
        assert (status["completed_jobs"], status["failed_jobs"], status["running_jobs"]) == (1, 1, [])
    assert worker.get_status()["state"] == "stopped"


def test_shutdown_gracefully_lets_running_jobs_finish_and_claims_nothing_new(engine, model):
    queue = GateQueue()
    worker = MQWorker(engine=engine, model=model, queues={"q": queue}, threads=2, **NO_POLLING)
    runner = threading.Thread(target=worker.run, daemon=True)
    runner.start()
    try:
        (running,) = enqueue(engine, model, ("q", "long", {"gate": "g"}))
        wait_until(lambda: queue.has_started(running))
        # from several threads at once
        barrier = threading.Barrier(4)
        errors: list[BaseException] = []

        def stop() -> None:
            try:
                barrier.wait(PATIENCE)
                worker.shutdown_gracefully()
            except BaseException as exc:
                errors.append(exc)

        stoppers = [threading.Thread(target=stop) for _ in range(4)]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(PATIENCE)
        assert errors == []
        assert worker.get_status()["state"] == "stopping"
        (late,) = enqueue(engine, model, ("q", "late", {}))  # an idle thread is free, yet no claim
        assert runner.is_alive()
        assert state_of(engine, model, running) == JobStates.RUNNING
        queue.gate("g").set()
        runner.join(PATIENCE)
        assert not runner.is_alive(), "run() did not return"
    finally:
        queue.open_all()
        worker.shutdown_gracefully()
        runner.join(PATIENCE)
    assert fetch_job(engine, model, running).state == JobStates.COMPLETED
    assert fetch_job(engine, model, running).result == {"done": running}
    assert state_of(engine, model, late) == JobStates.PENDING
    assert not queue.has_started(late)
    assert worker.get_status()["state"] == "stopped"
    worker.shutdown_gracefully()  # still harmless once stopped


def test_shutdown_before_run_makes_run_return(engine, model):
    worker = MQWorker(engine=engine, model=model, queues={"q": RecordingQueue()})
    worker.shutdown_gracefully()
    runner = threading.Thread(target=worker.run, daemon=True)
    runner.start()
    runner.join(PATIENCE)
    assert not runner.is_alive()
    with pytest.raises(RuntimeError):
        worker.run()  # a worker runs once


def test_constructor_validation(engine, model):
    def make(**kw: Any) -> MQWorker:
        args: dict[str, Any] = {"engine": engine, "model": model, "queues": {"q": RecordingQueue()}}
        args.update(kw)
        return MQWorker(**args)

    with pytest.raises(ValueError):
        make(queues={})
    with pytest.raises(ValueError):
        make(queues={"": RecordingQueue()})
    with pytest.raises(TypeError):
        make(queues={"q": object()})
    with pytest.raises(TypeError):
        make(queues={"q": RecordingQueue(), "r": lambda job: None})
    with pytest.raises(ValueError):
        make(threads=0)
    with pytest.raises(ValueError):
        make(threads=-1)
    with pytest.raises(ValueError):
        make(poll_interval=0)
    with pytest.raises(ValueError):
        make(maintenance_interval=-1)
    worker = make(threads=2, name="fine")
    assert worker.get_status()["state"] == "created"


# -- fencing --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("takeover", ["marked_lost", "claimed_again"])
def test_a_presumed_dead_worker_cannot_write_its_outcome(engine, model, takeover):
    def behaviour(job: Any) -> Any:
        job.cursor["written_by_zombie"] = True
        return {"zombie": True}

    queue = GateQueue(behaviour)
    with running_worker(engine, model, {"q": queue}) as worker, gates_opened_on_exit(queue):
        (job_id,) = enqueue(
            engine,
            model,
            ("q", "m", {"gate": "g"}),
            cursor_key="fenced",
            on_finish={"queue": "callbacks", "method": "done"},
        )
        wait_until(lambda: queue.has_started(job_id))
        if takeover == "marked_lost":
            sql(engine, "UPDATE mq_job SET state = 'lost', end_time = now() WHERE id = :id", id=job_id)
            expected_state = JobStates.LOST
        else:
            sql(engine, "UPDATE mq_job SET attempts = attempts + 1 WHERE id = :id", id=job_id)
            expected_state = JobStates.RUNNING
        queue.gate("g").set()
        wait_until(lambda: worker.get_status()["discarded_outcomes"] == 1)
        status = worker.get_status()
        assert (status["completed_jobs"], status["failed_jobs"]) == (0, 0)
    job = fetch_job(engine, model, job_id)
    assert job.state == expected_state
    assert job.result is None
    assert get_cursor(engine, model, "fenced") is None
    with Session(engine) as session:
        assert session.scalar(sa.select(sa.func.count()).where(model.Job.queue == "callbacks")) == 0


# -- subprocess workers: signals and liveness -----------------------------------------------------------------------

WORKER_SCRIPT = r"""
import os, sys, time
import sqlalchemy as sa
from psycopg2_mq import MQWorker, make_default_model

url, queue, capture = sys.argv[1], sys.argv[2], sys.argv[3] == "1"


class FileGate:
    def execute_job(self, job):
        release = job.args["release"]
        deadline = time.monotonic() + 120
        while not os.path.exists(release):
            if time.monotonic() > deadline:
                raise TimeoutError("never released")
            time.sleep(0.02)
        return {"pid": os.getpid()}


engine = sa.create_engine(url)
worker = MQWorker(engine=engine, model=make_default_model(sa.MetaData()), queues={queue: FileGate()},
                  capture_signals=capture)
worker.run()
print("run returned", flush=True)
"""


@contextlib.contextmanager
def worker_process(
    database_url: sa.URL, queue: str, capture_signals: bool
) -> Iterator[subprocess.Popen[str]]:
    url = database_url.render_as_string(hide_password=False)
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER_SCRIPT, url, queue, "1" if capture_signals else "0"],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=PATIENCE)


def worker_pid(engine: sa.Engine, model: Any, job_id: int) -> int | None:
    with Session(engine) as session:
        return session.scalar(
            sa.select(model.Worker.pid)
            .join(model.Job, model.Job.worker_id == model.Worker.id)
            .where(model.Job.id == job_id)
        )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_shuts_down_gracefully(engine, model, database_url, tmp_path, signum):
    release = tmp_path / "release"
    with worker_process(database_url, "signals", capture_signals=True) as proc:
        (job_id,) = enqueue(engine, model, ("signals", "m", {"release": str(release)}))
        wait_until(lambda: state_of(engine, model, job_id) == JobStates.RUNNING or proc.poll() is not None)
        assert worker_pid(engine, model, job_id) == proc.pid
        proc.send_signal(signum)
        # the job is still blocked, so the process cannot have exited
        assert proc.poll() is None
        assert state_of(engine, model, job_id) == JobStates.RUNNING
        release.touch()
        out, err = proc.communicate(timeout=PATIENCE)
        assert proc.returncode == 0, err
        assert "run returned" in out
    job = fetch_job(engine, model, job_id)
    assert job.state == JobStates.COMPLETED
    assert job.result == {"pid": proc.pid}


@pytest.mark.parametrize("resolution", ["fail_lost_job", "retry_job"])
def test_killed_worker_jobs_become_lost_and_hold_their_cursor(
    engine, model, database_url, tmp_path, resolution
):
    never = tmp_path / "never-created"
    queue = GateQueue()
    with worker_process(database_url, "liveness", capture_signals=False) as proc:
        (doomed,) = enqueue(engine, model, ("liveness", "m", {"release": str(never)}), cursor_key="acct")
        wait_until(lambda: state_of(engine, model, doomed) == JobStates.RUNNING or proc.poll() is not None)
        assert worker_pid(engine, model, doomed) == proc.pid
        with running_worker(engine, model, {"liveness": queue}, maintenance_interval=0.5, poll_interval=3600):
            # queued behind the doomed job; non-collapsible so that a retry makes a job of its own
            (waiting,) = enqueue(
                engine, model, ("liveness", "next", {}), cursor_key="acct", collapse_on_cursor=False
            )
            proc.kill()
            proc.wait(PATIENCE)
            lost = wait_for_state(engine, model, doomed, JobStates.LOST)
            assert lost.result is None
            # the lost job holds its cursor: a later job is claimed, the waiting one is not
            (sentinel,) = enqueue(engine, model, ("liveness", "sentinel", {}))
            wait_for_state(engine, model, sentinel, JobStates.COMPLETED)
            assert state_of(engine, model, waiting) == JobStates.PENDING
            assert not queue.has_started(waiting)

            with Session(engine) as session, session.begin():
                mq = MQSource(dbsession=session, model=model)
                if resolution == "fail_lost_job":
                    mq.fail_lost_job(doomed)
                    retry_id = None
                else:
                    retry_id = mq.retry_job(doomed).id
            failed = fetch_job(engine, model, doomed)
            assert failed.state == JobStates.FAILED
            assert failed.result["error"]["type"] == "LostJob"
            wait_for_state(engine, model, waiting, JobStates.COMPLETED)
            if retry_id is not None:
                retried = wait_for_state(engine, model, retry_id, JobStates.COMPLETED)
                assert retried.trace["retry_of"] == doomed
                assert queue.contexts[retry_id]["args"] == {"release": str(never)}
