"""Fault 3: the database goes away under the workers.

Connections are cut with ``pg_terminate_backend`` (only backends of the test's
own database), or a private PostgreSQL is restarted with ``pg_ctl``. Workers
must reconnect with backoff, log once per outage, and no job may be dropped:
its outcome is written, or the lost-job policy recovers it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from psycopg2_mq import Backoff, MQSource

from .helpers import (
    EXEC_LOG,
    PrivateServer,
    WorkerFleet,
    check_drain,
    count_lines,
    dispatcher_backend,
    drain,
    enqueue,
    executions,
    job_row,
    poll_for,
    terminate,
    terminate_all_backends,
    wait_for_state,
    wait_until,
    worker_backends,
    worker_fleet,
)

LOST_LINE = "lost its database connection"
BACK_LINE = "reconnected after"
#: the restart/terminate drains: lost jobs are retried, with room for several faults
DRAIN_CALL = {"lost_policy": "retry", "max_attempts": 10, "backoff": Backoff(base=0.05, cap=0.5)}


@pytest.mark.timeout(120)
def test_dispatcher_connection_terminated_worker_reconnects_and_keeps_its_job(
    engine: sa.Engine, model: Any, fleet: WorkerFleet, exec_log: str, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    a = fleet.start("a", ["db"], maintenance_interval=0.5, log_table=EXEC_LOG)
    a_id = a.wait_registered(engine)
    job_id = enqueue(engine, model, "db", "m", {"gate": str(gate)}, lost_policy="hold")
    wait_until(lambda: job_row(engine, job_id)["state"] == "running")
    backend = dispatcher_backend(engine, model.lock_class, a_id)
    assert backend is not None and terminate(engine, [backend]) == 1
    wait_until(lambda: count_lines(a.log(), BACK_LINE) == 1)
    # no other worker ran maintenance meanwhile, so it took its own lock back:
    # same worker id, its running job still its own
    assert dispatcher_backend(engine, model.lock_class, a_id) not in (None, backend)
    gate.touch()
    done = wait_for_state(engine, job_id, "completed", "failed", "lost")
    assert (done["state"], done["attempts"], done["result"]["pid"]) == ("completed", 1, a.pid)
    after = enqueue(engine, model, "db", "after", {})
    assert wait_for_state(engine, after, "completed")["state"] == "completed"  # claims again
    assert count_lines(a.log(), LOST_LINE) == 1
    assert a.stop() == 0


@pytest.mark.timeout(120)
def test_completer_connection_terminated_outcome_is_still_written(
    engine: sa.Engine, model: Any, fleet: WorkerFleet, exec_log: str, tmp_path: Path
) -> None:
    a = fleet.start("a", ["db"], maintenance_interval=0.5, log_table=EXEC_LOG)
    a_id = a.wait_registered(engine)
    first = enqueue(engine, model, "db", "m", {})
    wait_for_state(engine, first, "completed")  # the completer has connected
    backends = worker_backends(engine, "a")
    dispatcher = dispatcher_backend(engine, model.lock_class, a_id)
    completer = [pid for pid in backends if pid != dispatcher]
    assert len(completer) == 1, backends
    assert terminate(engine, completer) == 1
    job_id = enqueue(engine, model, "db", "m", {})
    done = wait_for_state(engine, job_id, "completed", "failed")
    assert (done["state"], done["attempts"]) == ("completed", 1)
    assert a.alive() and a.stop() == 0


@contextlib.contextmanager
def _drain_through(
    model: Any, private_pg: PrivateServer, tmp_path: Path, fault: Any, *, jobs: int, cursors: int, workers: int
) -> Iterator[WorkerFleet]:
    """Drain through two faults of the private server and check every invariant;
    the block then looks at the fleet before it stops."""
    engine = private_pg.engine
    assert engine is not None
    with worker_fleet(engine.url, tmp_path) as fleet:
        report = drain(
            engine,
            model,
            fleet,
            jobs=jobs,
            cursors=cursors,
            workers=workers,
            threads=2,
            fault=fault,
            fault_at=(0.25, 0.6),
            job_args={"sleep": 0.002},
            call=DRAIN_CALL,
        )
        print("\n" + report.summary())
        assert len(report.faults) == 2
        check_drain(report)
        yield fleet
        report.raise_if_stranded()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_terminating_all_backends_while_draining_loses_nothing(
    engine: sa.Engine, model: Any, fleet: WorkerFleet, exec_log: str, database_url: sa.URL
) -> None:
    monitor = sa.create_engine(database_url, pool_pre_ping=True)
    try:
        report = drain(
            engine,
            model,
            fleet,
            jobs=5000,
            cursors=50,
            workers=4,
            threads=2,
            fault=lambda: terminate_all_backends(monitor),
            fault_at=(0.2, 0.5, 0.8),
            job_args={"sleep": 0.002},
            call=DRAIN_CALL,
            monitor=monitor,
        )
    finally:
        monitor.dispose()
        # our own idle pooled connections were cut too: start the session engine afresh
        engine.dispose()
    print("\n" + report.summary())
    assert len(report.faults) == 3
    check_drain(report)
    for proc in fleet.started:
        log = proc.log()
        # once per outage: at most one error and one recovery line per fault, never one per retry
        assert count_lines(log, LOST_LINE) <= 3 and count_lines(log, BACK_LINE) == count_lines(log, LOST_LINE)
    report.raise_if_stranded()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_postgres_restart_while_draining_loses_nothing(
    model: Any, private_pg: PrivateServer, tmp_path: Path
) -> None:
    with _drain_through(model, private_pg, tmp_path, private_pg.restart, jobs=5000, cursors=50, workers=4) as fleet:
        for proc in fleet.started:
            log = proc.log()
            assert count_lines(log, LOST_LINE) <= 2 and count_lines(log, BACK_LINE) == count_lines(
                log, LOST_LINE
            )


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("cursors", [0, 50], ids=["no-cursor", "cursors"])
def test_postgres_crash_while_draining_loses_nothing(
    model: Any, private_pg: PrivateServer, tmp_path: Path, cursors: int
) -> None:
    """A crash (``-m immediate``): WAL not yet flushed is lost, claims of jobs
    without a cursor included, as they commit asynchronously (CLAIM_JOBS).

    Such a claim is only lost with nothing after it flushed: a run that logged
    its execution (a durable commit) made its claim durable too. So the usual
    invariants hold: one final outcome per job, no claim run twice, cursors
    serial.
    """
    with _drain_through(model, private_pg, tmp_path, private_pg.crash, jobs=3000, cursors=cursors, workers=3):
        pass


@pytest.mark.timeout(180)
def test_outage_is_logged_once_and_the_in_flight_job_is_not_dropped(
    model: Any, private_pg: PrivateServer, tmp_path: Path
) -> None:
    """The server is down for 3 s: many reconnection attempts, one error line, one recovery line."""
    engine = private_pg.engine
    assert engine is not None
    gate = tmp_path / "gate"
    with worker_fleet(engine.url, tmp_path) as fleet:
        a = fleet.start("a", ["db"], maintenance_interval=0.5, log_table=EXEC_LOG)
        a.wait_registered(engine)
        job_id = enqueue(engine, model, "db", "m", {"gate": str(gate)}, lost_policy="retry", max_attempts=3)
        wait_until(lambda: job_row(engine, job_id)["state"] == "running")
        private_pg.stop()
        gate.touch()  # the job ends while the database is down: its outcome must wait
        time.sleep(3)
        private_pg.start()
        done = wait_for_state(engine, job_id, "completed", "failed")
        print(f"\nafter a 3 s outage: job {done['state']} at attempt {done['attempts']}")
        # written by the completer, which retried through the outage: not run again
        assert (done["state"], done["attempts"], done["result"]["pid"]) == ("completed", 1, a.pid)
        # the dispatcher backs off up to 5 s between attempts: wait for it to be back
        wait_until(lambda: count_lines(a.log(), BACK_LINE) >= 1)
        log = a.log()
        assert count_lines(log, LOST_LINE) == 1 and count_lines(log, BACK_LINE) == 1, log[-3000:]
        after = enqueue(engine, model, "db", "after", {})
        assert wait_for_state(engine, after, "completed")["state"] == "completed"
        assert a.stop() == 0


@pytest.mark.timeout(180)
def test_outage_longer_than_the_completer_retries_does_not_strand_the_job(
    model: Any, private_pg: PrivateServer, tmp_path: Path
) -> None:
    """An outcome the completer gave up on must not leave its job running for ever.

    Regression: before 975150d the job stayed ``running`` for ever (the worker
    took the same lock back on reconnect, so no lost-job pass released it).

    The completer's give-up time (60 s) is shortened to 1 s in the worker
    process, so that a 4 s outage outlasts it, as a 61 s one would in production.
    """
    engine = private_pg.engine
    assert engine is not None
    gate = tmp_path / "gate"
    with worker_fleet(engine.url, tmp_path) as fleet:
        a = fleet.start("a", ["db"], maintenance_interval=0.5, log_table=EXEC_LOG, finish_retry_seconds=1.0)
        a_id = a.wait_registered(engine)
        job_id = enqueue(
            engine, model, "db", "m", {"gate": str(gate)}, cursor_key="k", lost_policy="retry", max_attempts=3
        )
        waiting = enqueue(engine, model, "db", "next", {}, cursor_key="k", collapse_on_cursor=False)
        wait_until(lambda: job_row(engine, job_id)["state"] == "running")
        private_pg.stop()
        gate.touch()
        time.sleep(4)
        private_pg.start()
        wait_until(lambda: count_lines(a.log(), BACK_LINE) == 1)
        assert count_lines(a.log(), "could not record the outcomes") == 1  # the completer gave up
        # the worker is back, with its old id and lock, and idle: give it ample time
        settled = poll_for(lambda: job_row(engine, job_id)["state"] != "running", timeout=30)
        row = job_row(engine, job_id)
        assert settled, (
            f"job {job_id} still running on worker {row['worker_id']} (a is {a_id}, "
            f"holding lock: {dispatcher_backend(engine, model.lock_class, a_id) is not None}), "
            f"30 s after the worker reconnected; job {waiting} waits behind it on its cursor"
        )
        assert wait_for_state(engine, job_id, "completed")["state"] == "completed"
        assert wait_for_state(engine, waiting, "completed")["state"] == "completed"


@pytest.mark.timeout(120)
def test_worker_that_reconnects_with_its_old_id_is_still_registered(
    engine: sa.Engine, model: Any, fleet: WorkerFleet, tmp_path: Path
) -> None:
    """Regression: the row another worker's maintenance deleted comes back when the worker rejoins.

    (Found failing before 15dbc85: explain_job then said no live worker served the queue.)
    """
    a = fleet.start("a", ["only-a"], maintenance_interval=0.5)
    a_id = a.wait_registered(engine)
    b = fleet.start("b", ["only-b"], maintenance_interval=0.2)
    b.wait_registered(engine)
    a.pause()
    backend = dispatcher_backend(engine, model.lock_class, a_id)
    assert backend is not None and terminate(engine, [backend]) == 1
    wait_until(lambda: a.worker_id(engine) is None)  # b forgot the dead-looking worker
    a.resume()
    wait_until(lambda: count_lines(a.log(), BACK_LINE) == 1)
    # a is alive and serving, with its old id and lock
    assert dispatcher_backend(engine, model.lock_class, a_id) is not None
    job_id = enqueue(engine, model, "only-a", "m", {})
    assert wait_for_state(engine, job_id, "completed")["worker_id"] == a_id
    later = enqueue(engine, model, "only-a", "m", {}, when=timedelta(hours=1))
    with Session(engine) as session:
        reasons = MQSource(dbsession=session, model=model).explain_job(later)["reasons"]
    assert len(reasons) == 1 and reasons[0].startswith("waiting for its time"), reasons
    assert a.worker_id(engine) == a_id, "a live worker has no mq_worker row"


@pytest.mark.timeout(120)
def test_claim_whose_reply_was_lost_does_not_strand_its_jobs(
    engine: sa.Engine, model: Any, fleet: WorkerFleet, exec_log: str
) -> None:
    """A claim that committed but whose rows never reached the worker must not strand its jobs.

    Regression: before 975150d the jobs stayed ``running`` for ever under the
    live worker. A ``pg_terminate_backend`` or a restart during a busy drain hit
    this in most runs (see the drains, which would now fail with StrandedClaims).
    """
    a = fleet.start("a", ["db"], maintenance_interval=0.3, log_table=EXEC_LOG, lose_claim_reply_once=True)
    a_id = a.wait_registered(engine)
    job_id = enqueue(engine, model, "db", "m", {}, cursor_key="k", lost_policy="retry", max_attempts=3)
    waiting = enqueue(engine, model, "db", "next", {}, cursor_key="k", collapse_on_cursor=False)
    wait_until(lambda: count_lines(a.log(), BACK_LINE) == 1)
    assert count_lines(a.log(), "injected: reply of a claim") == 1
    # a is alive, back under its old id and lock, and idle: give it ample time
    settled = poll_for(lambda: job_row(engine, job_id)["state"] != "running", timeout=30)
    row = job_row(engine, job_id)
    assert settled, (
        f"job {job_id} still running on worker {row['worker_id']} (a is {a_id}, holding its lock: "
        f"{dispatcher_backend(engine, model.lock_class, a_id) is not None}), never executed "
        f"({[e.attempt for e in executions(engine) if e.job_id == job_id]}); job {waiting} waits behind it"
    )
    assert wait_for_state(engine, job_id, "completed")["state"] == "completed"
    assert wait_for_state(engine, waiting, "completed")["state"] == "completed"
