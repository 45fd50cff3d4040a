"""Retries, backoff, snoozes, per-queue vs per-call policy, pruning and the inspection API.

Workers run in threads here: these are the policies' semantics, not process
faults. Delays are checked on the database clock and only from below (a job
must never start before its backoff ends), never as a speed claim.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from psycopg2_mq import Backoff, JobPolicy, MQSource, RetryJob
from psycopg2_mq._maintenance import prune_finished_jobs
from psycopg2_mq._queries import Queries
from tests.support import RecordingQueue, running_worker

from .helpers import enqueue, job_row, wait_for_state, wait_until

pytestmark = pytest.mark.timeout(120)


def _failing(times: int) -> Any:
    """A behaviour that raises on the first ``times`` attempts of each job."""

    def behaviour(job: Any) -> Any:
        if job.attempt <= times:
            raise RuntimeError(f"boom {job.attempt}")
        return {"attempt": job.attempt}

    return behaviour


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


def test_failed_attempts_are_retried_after_their_backoff_keeping_each_error(
    engine: sa.Engine, model: Any
) -> None:
    backoff = Backoff(base=0.3, factor=2, cap=10, jitter=False)
    with running_worker(engine, model, {"q": RecordingQueue(_failing(2))}, maintenance_interval=0.2):
        job_id = enqueue(engine, model, "q", "m", {}, max_attempts=3, backoff=backoff)
        done = wait_for_state(engine, job_id, "completed", "failed")
    assert (done["state"], done["attempts"], done["result"]) == ("completed", 3, {"attempt": 3})
    errors = done["errors"]
    assert [(e["attempt"], e["message"]) for e in errors] == [(1, "boom 1"), (2, "boom 2")]
    assert all(e["type"] == "builtins.RuntimeError" and "Traceback" in e["traceback"] for e in errors)
    # attempt 2 never started before attempt 1's backoff (0.3 s), attempt 3 before 0.6 s
    assert (_ts(errors[1]["start_time"]) - _ts(errors[0]["end_time"])).total_seconds() >= 0.3
    assert (done["start_time"] - _ts(errors[1]["end_time"])).total_seconds() >= 0.6


def test_the_last_failure_leaves_the_job_failed(engine: sa.Engine, model: Any) -> None:
    with running_worker(engine, model, {"q": RecordingQueue(_failing(99))}, maintenance_interval=0.2):
        job_id = enqueue(
            engine, model, "q", "m", {}, max_attempts=2, backoff=Backoff(base=0.05, jitter=False)
        )
        done = wait_for_state(engine, job_id, "completed", "failed")
    assert (done["state"], done["attempts"]) == ("failed", 2)
    assert done["result"]["error"]["message"] == "boom 2"
    assert [e["message"] for e in done["errors"]] == ["boom 1"]


def test_queue_policy_with_a_custom_backoff_and_a_call_that_overrides_it(
    engine: sa.Engine, model: Any
) -> None:
    asked: list[int] = []
    lock = threading.Lock()

    def backoff(attempt: int) -> float:
        with lock:
            asked.append(attempt)
        return 0.05 * attempt

    queue = RecordingQueue(_failing(99))
    queue.policy = JobPolicy(max_attempts=3, backoff=backoff)  # type: ignore[attr-defined]
    with running_worker(engine, model, {"q": queue}, maintenance_interval=0.2):
        by_queue = enqueue(engine, model, "q", "m", {})
        by_call = enqueue(engine, model, "q", "m", {}, max_attempts=1)
        a = wait_for_state(engine, by_queue, "completed", "failed")
        b = wait_for_state(engine, by_call, "completed", "failed")
    assert (a["state"], a["attempts"], a["max_attempts"]) == ("failed", 3, 3)
    assert (b["state"], b["attempts"], b["max_attempts"]) == ("failed", 1, 1)
    assert sorted(asked) == [1, 2]  # the function was asked after attempts 1 and 2 only


def test_retry_job_exception_snoozes_without_using_an_attempt(engine: sa.Engine, model: Any) -> None:
    def behaviour(job: Any) -> Any:
        if job.attempt == 1:
            raise RetryJob(delay=0.5, reason="not yet")
        return {"attempt": job.attempt}

    with running_worker(engine, model, {"q": RecordingQueue(behaviour)}, maintenance_interval=0.2):
        job_id = enqueue(engine, model, "q", "m", {}, max_attempts=1)
        done = wait_for_state(engine, job_id, "completed", "failed")
    assert (done["state"], done["attempts"], done["result"]) == ("completed", 2, {"attempt": 2})
    assert done["max_attempts"] == 2  # the snooze gave its attempt back
    (snooze,) = done["errors"]
    assert (snooze["type"], snooze["message"], snooze["attempt"]) == ("RetryJob", "not yet", 1)
    assert (done["start_time"] - _ts(snooze["end_time"])).total_seconds() >= 0.5


def test_backoff_values() -> None:
    plain = Backoff(base=1, factor=3, cap=20, jitter=False)
    assert [plain.delay(a) for a in range(1, 6)] == [1, 3, 9, 20, 20]
    jittered = Backoff(base=1, factor=2, cap=8, jitter=True)
    for attempt, full in [(1, 1), (2, 2), (3, 4), (4, 8), (9, 8)]:
        for _ in range(50):
            assert full / 2 <= jittered.delay(attempt) <= full
    with pytest.raises(ValueError):
        Backoff(factor=0.5)
    with pytest.raises(ValueError):
        RetryJob(delay=-1)


# -- pruning -------------------------------------------------------------------------------------------------


def _insert_finished(
    engine: sa.Engine, state: str, count: int, age_seconds: float, cursor: str | None
) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO mq_job (queue, method, args, state, cursor_key, collapsible, end_time) "
            "SELECT 'p', 'm', '{}', %(state)s, %(cursor)s, false, now() - make_interval(secs => %(age)s) "
            "FROM generate_series(1, %(n)s)",
            {"state": state, "n": count, "age": age_seconds, "cursor": cursor},
        )


def _count(engine: sa.Engine, where: str = "true") -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql(f"SELECT count(*) FROM mq_job WHERE {where}").scalar_one())


def test_maintenance_prunes_old_finished_jobs_per_state_and_keeps_cursors(
    engine: sa.Engine, model: Any
) -> None:
    _insert_finished(engine, "completed", 2500, 7200, "kept-cursor")
    _insert_finished(engine, "completed", 10, 60, None)  # younger than the retention
    _insert_finished(engine, "failed", 30, 7200, None)  # failed kept longer
    _insert_finished(engine, "failed", 20, 4 * 86400, None)
    _insert_finished(engine, "canceled", 5, 30 * 86400, None)  # no retention: never pruned
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO mq_cursor (key, properties) VALUES ('kept-cursor', '{\"n\": 1}')")
    pending = enqueue(engine, model, "p", "m", {}, when=timedelta(hours=1))
    retention = {"completed": 3600, "failed": timedelta(days=2)}
    with running_worker(
        engine, model, {"p": RecordingQueue()}, maintenance_interval=0.2, prune_after=retention
    ):
        wait_until(
            lambda: _count(engine, "state = 'completed'") == 10 and _count(engine, "state = 'failed'") == 30
        )
    assert _count(engine, "state = 'canceled'") == 5
    assert job_row(engine, pending)["state"] == "pending"
    with Session(engine) as session:
        assert MQSource(dbsession=session, model=model).get_cursor("kept-cursor") == {"n": 1}


def test_pruning_goes_in_small_batches_and_skips_locked_rows(engine: sa.Engine, model: Any) -> None:
    _insert_finished(engine, "completed", 2345, 7200, None)
    with engine.connect() as conn:
        held = conn.exec_driver_sql("SELECT min(id) FROM mq_job").scalar_one()
    statements: list[int] = []
    queries = Queries.for_model(model)
    with engine.connect() as locker:
        # another transaction holds a row lock on one doomed row: pruning must not wait for it
        locker.exec_driver_sql("SELECT 1 FROM mq_job WHERE id = %(id)s FOR UPDATE", {"id": held})
        raw = engine.raw_connection()
        try:
            raw.driver_connection.autocommit = True
            real_conn = raw.driver_connection

            class CountingCursor:
                """Delegates to a psycopg2 cursor, noting each statement's batch size."""

                def __init__(self) -> None:
                    self._cur = real_conn.cursor()

                def __enter__(self) -> CountingCursor:
                    return self

                def __exit__(self, *exc: Any) -> None:
                    self._cur.close()

                def execute(self, sql: str, params: Any = None) -> None:
                    statements.append(params["batch"])
                    self._cur.execute(sql, params)

                @property
                def rowcount(self) -> int:
                    return int(self._cur.rowcount)

            class Counting:
                def cursor(self) -> CountingCursor:
                    return CountingCursor()

            deleted = prune_finished_jobs(Counting(), queries, {"completed": 3600}, batch=500)
        finally:
            raw.close()
        locker.rollback()
    assert deleted == 2344
    assert _count(engine) == 1
    assert len(statements) == 5  # 4 full batches of 500, then one short: each a short transaction


# -- inspection ----------------------------------------------------------------------------------------------


def test_blocked_cursors_and_explain_job_say_why_a_job_waits(engine: sa.Engine, model: Any) -> None:
    release = threading.Event()

    def behaviour(job: Any) -> Any:
        if job.method == "long":
            release.wait(60)
        return {}

    queue = RecordingQueue(behaviour)
    try:
        with running_worker(engine, model, {"q": queue}, threads=1, maintenance_interval=0.2):
            long = enqueue(engine, model, "q", "long", {}, cursor_key="busy")
            wait_until(lambda: job_row(engine, long)["state"] == "running")
            behind = enqueue(engine, model, "q", "behind", {}, cursor_key="busy", collapse_on_cursor=False)
            behind2 = enqueue(engine, model, "q", "behind2", {}, cursor_key="busy", collapse_on_cursor=False)
            later = enqueue(engine, model, "q", "later", {}, when=timedelta(minutes=5))
            ready = enqueue(engine, model, "q", "ready", {})  # the only thread is busy
            orphan = enqueue(engine, model, "nobody-serves-this", "m", {})
            wait_until(lambda: _held_for(engine, long) > 0.3)
            with Session(engine) as session:
                mq = MQSource(dbsession=session, model=model)
                assert mq.blocked_cursors() == []  # nothing lost, and no threshold asked
                (entry,) = mq.blocked_cursors(running_longer_than=0.3)
                assert (entry["cursor_key"], entry["job_id"], entry["state"], entry["waiting"]) == (
                    "busy",
                    long,
                    "running",
                    2,
                )
                assert entry["held_seconds"] > 0.3
                assert mq.blocked_cursors(running_longer_than=timedelta(hours=1)) == []
                assert mq.explain_job(behind)["reasons"] == [
                    f"its cursor 'busy' is held by job {long} (running)"
                ]
                assert mq.explain_job(behind2)["reasons"] == [
                    f"its cursor 'busy' is held by job {long} (running)",
                    "1 job(s) ahead of it on cursor 'busy'",
                ]
                assert mq.explain_job(later)["reasons"][0].startswith("waiting for its time: due in")
                assert mq.explain_job(ready)["reasons"] == ["ready"]
                assert mq.explain_job(orphan)["reasons"] == [
                    "no live worker serves queue 'nobody-serves-this'"
                ]
                assert mq.explain_job(long)["reasons"] == ["the job is running, not pending"]
            release.set()
            wait_for_state(engine, behind2, "completed")
    finally:
        release.set()


def _held_for(engine: sa.Engine, job_id: int) -> float:
    with engine.connect() as conn:
        return float(
            conn.exec_driver_sql(
                "SELECT EXTRACT(EPOCH FROM now() - start_time) FROM mq_job WHERE id = %(id)s", {"id": job_id}
            ).scalar_one()
        )
