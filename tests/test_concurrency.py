"""Many workers at once against the real database.

* threads: three ``MQWorker``s (3 + 3 + 1 threads) drain 600 calls over five
  cursors (mostly non-collapsible, so jobs queue up per cursor) and cursor-less
  jobs; every job runs exactly once and no two jobs of a cursor overlap.
* processes: three worker processes (spawned, 2 threads each, engines of their
  own) record their executions in a side table on the database clock.
* collapse race: eight threads call on one cursor at once, over and over, while
  a worker claims; there is never more than one pending collapsible job and
  every id a call returns is the pending job or one claimed meanwhile.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from collections import Counter
from contextlib import ExitStack
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from psycopg2_mq import JobStates, MQSource, MQWorker, make_default_model
from psycopg2_mq import _liveness as liveness
from psycopg2_mq._claim import claim_jobs
from psycopg2_mq._queries import Queries

from .support import running_worker, wait_until

CURSORS = [f"c{i}" for i in range(5)]
#: bound for draining a few hundred jobs; never a speed claim
DRAIN_PATIENCE = 120.0


def _counting_execute(job: Any) -> None:
    """What every job does: bump its cursor's counter, take a little time."""
    if job.cursor is not None:
        job.cursor["n"] = job.cursor.get("n", 0) + 1
    time.sleep((job.id % 3) * 0.001)


class TimedQueue:
    """Records (job id, cursor key, start, end) of each execution, on time.monotonic()."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.executions: list[tuple[int, str | None, float, float]] = []

    def execute_job(self, job: Any) -> Any:
        start = time.monotonic()
        _counting_execute(job)
        end = time.monotonic()
        with self.lock:
            self.executions.append((job.id, job.cursor_key, start, end))
        return {"ran": job.id}


def _calls(count: int, offset: int = 0) -> list[dict[str, Any]]:
    """A mix: 40% cursor-less, 50% non-collapsible on a cursor, 10% collapsible on a cursor."""
    calls = []
    for n in range(offset, offset + count):
        kind = n % 10
        key = None if kind < 4 else CURSORS[n % len(CURSORS)]
        calls.append(
            {
                "queue": "work",
                "method": "run",
                "args": {"n": n},
                "cursor_key": key,
                "collapse_on_cursor": key is None or kind == 9,
            }
        )
    return calls


def _enqueue_many(engine: sa.Engine, model: Any, calls: list[dict[str, Any]], batch: int) -> list[int]:
    ids: list[int] = []
    for start in range(0, len(calls), batch):
        with Session(engine) as session, session.begin():
            ids.extend(MQSource(dbsession=session, model=model).call_many(calls[start : start + batch]))
    return ids


def _enqueue_one_by_one(engine: sa.Engine, model: Any, calls: list[dict[str, Any]], batch: int) -> list[int]:
    ids: list[int] = []
    for start in range(0, len(calls), batch):
        with Session(engine) as session, session.begin():
            source = MQSource(dbsession=session, model=model)
            ids.extend(source.call(**call).id for call in calls[start : start + batch])
    return ids


def _unfinished(engine: sa.Engine, model: Any) -> int:
    Job = model.Job
    with Session(engine) as session:
        return session.scalar(
            sa.select(sa.func.count()).where(
                Job.state.in_([JobStates.PENDING, JobStates.RUNNING, JobStates.LOST])
            )
        )


def _assert_finished_once(engine: sa.Engine, model: Any, ids: set[int], ran: Counter[int]) -> dict[str, int]:
    """Every job ran exactly once and is completed with one attempt; returns jobs per cursor."""
    twice = sorted(i for i, n in ran.items() if n > 1)
    assert not twice, f"jobs executed more than once: {twice}"
    assert set(ran) == ids, f"never executed: {sorted(ids - set(ran))}; unknown: {sorted(set(ran) - ids)}"
    Job = model.Job
    with Session(engine) as session:
        rows = session.execute(
            sa.select(Job.id, Job.state, Job.attempts, Job.cursor_key, Job.scheduled_time, Job.start_time)
        ).all()
        saved = {
            key: props
            for key, props in session.execute(sa.select(model.JobCursor.key, model.JobCursor.properties))
        }
    assert {r.id for r in rows} == ids, "job rows differ from the ids the calls returned"
    bad = [r for r in rows if r.state != JobStates.COMPLETED or r.attempts != 1]
    assert not bad, f"not completed exactly once: {bad[:10]}"
    assert all(r.start_time >= r.scheduled_time for r in rows)
    per_cursor = Counter(r.cursor_key for r in rows if r.cursor_key is not None)
    # no lost update: each job of a cursor saw the count its predecessor saved
    assert saved == {key: {"n": n} for key, n in per_cursor.items()}
    return dict(per_cursor)


def _assert_no_overlap(executions: list[tuple[int, str | None, Any, Any]]) -> None:
    by_cursor: dict[str, list[tuple[int, str | None, Any, Any]]] = {}
    for e in executions:
        if e[1] is not None:
            by_cursor.setdefault(e[1], []).append(e)
    for key, runs in by_cursor.items():
        runs.sort(key=lambda e: e[2])
        for prev, nxt in zip(runs, runs[1:], strict=False):
            assert nxt[2] >= prev[3], f"jobs {prev[0]} and {nxt[0]} overlapped on cursor {key}: {prev} {nxt}"


def test_worker_threads_run_each_job_once_and_cursors_serially(engine: sa.Engine, model: Any) -> None:
    queue = TimedQueue()
    # half queued before any worker runs, half while they run (wake-ups by NOTIFY)
    ids = _enqueue_many(engine, model, _calls(300), batch=100)
    with ExitStack() as stack:
        for name, threads in (("t3a", 3), ("t3b", 3), ("t1", 1)):
            stack.enter_context(running_worker(engine, model, {"work": queue}, name=name, threads=threads))
        ids += _enqueue_one_by_one(engine, model, _calls(300, offset=300), batch=20)
        wait_until(lambda: _unfinished(engine, model) == 0, timeout=DRAIN_PATIENCE, interval=0.1)
    with queue.lock:
        executions = list(queue.executions)
    distinct = set(ids)
    # collapsible calls may share a job; the rest made one job each
    assert len(distinct) >= len(
        [c for c in _calls(600) if not c["collapse_on_cursor"] or c["cursor_key"] is None]
    )
    _assert_no_overlap(executions)
    per_cursor = _assert_finished_once(engine, model, distinct, Counter(e[0] for e in executions))
    assert set(per_cursor) == set(CURSORS)
    assert min(per_cursor.values()) >= 50  # jobs really queued up on each cursor


# -- worker processes ------------------------------------------------------------------------

EXEC_LOG = "mq_test_exec_log"


class LoggingQueue:
    """Runs in a worker process: logs each execution to EXEC_LOG on the database clock.

    The worker's connections are its own, so the job writes with a short
    connection of its own (one per executor thread), committing at once.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def execute_job(self, job: Any) -> Any:
        with self.engine.begin() as conn:
            log_id = conn.exec_driver_sql(
                f"INSERT INTO {EXEC_LOG} (job_id, cursor_key, pid, started) "
                "VALUES (%(job_id)s, %(cursor_key)s, pg_backend_pid(), clock_timestamp()) RETURNING id",
                {"job_id": job.id, "cursor_key": job.cursor_key},
            ).scalar_one()
        _counting_execute(job)
        with self.engine.begin() as conn:
            conn.exec_driver_sql(
                f"UPDATE {EXEC_LOG} SET ended = clock_timestamp() WHERE id = %(id)s", {"id": log_id}
            )
        return {"ran": job.id}


def _worker_process(url: str, name: str, threads: int) -> None:
    """Entry point of a spawned worker process; SIGTERM stops it gracefully."""
    engine = sa.create_engine(url, pool_size=threads + 1)
    model = make_default_model(sa.MetaData())
    worker = MQWorker(
        engine=engine,
        model=model,
        queues={"work": LoggingQueue(engine)},
        name=name,
        threads=threads,
        capture_signals=True,
    )
    try:
        worker.run()
    finally:
        engine.dispose()


@pytest.fixture
def exec_log(engine: sa.Engine) -> Any:
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {EXEC_LOG}")
        conn.exec_driver_sql(
            f"CREATE TABLE {EXEC_LOG} (id bigserial PRIMARY KEY, job_id bigint NOT NULL, cursor_key text, "
            "pid int, started timestamptz NOT NULL, ended timestamptz)"
        )
    yield EXEC_LOG
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {EXEC_LOG}")


def test_worker_processes_run_each_job_once_and_cursors_serially(
    engine: sa.Engine, model: Any, database_url: sa.URL, exec_log: str
) -> None:
    url = database_url.render_as_string(hide_password=False)
    ctx = multiprocessing.get_context("spawn")
    processes = [
        ctx.Process(target=_worker_process, args=(url, f"proc-{i}", 2), name=f"mq-proc-{i}") for i in range(3)
    ]
    ids = _enqueue_many(engine, model, _calls(150), batch=50)
    for process in processes:
        process.start()

    def alive() -> bool:
        dead = [(p.name, p.exitcode) for p in processes if not p.is_alive()]
        assert not dead, f"worker processes died: {dead}"
        return True

    try:
        Worker = model.Worker
        with Session(engine) as session:
            wait_until(
                lambda: alive() and session.scalar(sa.select(sa.func.count()).select_from(Worker)) == 3,
                timeout=60,
            )
        ids += _enqueue_one_by_one(engine, model, _calls(150, offset=150), batch=10)
        wait_until(lambda: alive() and _unfinished(engine, model) == 0, timeout=DRAIN_PATIENCE, interval=0.1)
    finally:
        # SIGTERM: the workers (capture_signals=True) shut down gracefully
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(60)
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
    assert [p.exitcode for p in processes] == [0, 0, 0]
    with engine.connect() as conn:
        executions = [
            tuple(row)
            for row in conn.exec_driver_sql(
                f"SELECT job_id, cursor_key, started, ended FROM {exec_log} ORDER BY id"
            )
        ]
        backends = conn.exec_driver_sql(f"SELECT count(DISTINCT pid) FROM {exec_log}").scalar_one()
    assert all(e[3] is not None for e in executions), "an execution never ended"
    _assert_no_overlap(executions)
    _assert_finished_once(engine, model, set(ids), Counter(e[0] for e in executions))
    assert backends > 1  # the work really was spread over several connections


# -- collapse race -------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["call", "call_many"])
def test_concurrent_calls_collapse_onto_one_pending_job(engine: sa.Engine, model: Any, api: str) -> None:
    callers = 8
    rounds = 25
    Job = model.Job
    queue = TimedQueue()
    barrier = threading.Barrier(callers)
    errors: list[BaseException] = []
    stop_watch = threading.Event()
    watched: Counter[str] = Counter()

    def watch() -> None:
        """Sample the cursor's jobs while the race goes on."""
        with Session(engine) as session:
            while not stop_watch.is_set():
                pending, holding = session.execute(
                    sa.select(
                        sa.func.count().filter(Job.state == JobStates.PENDING, Job.collapsible),
                        sa.func.count().filter(Job.state.in_(JobStates.HOLDING_CURSOR)),
                    ).where(Job.cursor_key == "k")
                ).one()
                session.rollback()
                watched["samples"] += 1
                watched["max_pending"] = max(watched["max_pending"], pending)
                watched["max_holding"] = max(watched["max_holding"], holding)

    def caller(results: list[int], index: int, round_no: int) -> None:
        try:
            barrier.wait(10)
            with Session(engine) as session, session.begin():
                source = MQSource(dbsession=session, model=model)
                args = {"round": round_no, "caller": index}
                if api == "call":
                    results.append(source.call("work", "run", args, cursor_key="k").id)
                else:
                    entry = {"queue": "work", "method": "run", "args": args, "cursor_key": "k"}
                    # two calls of one batch: the second may get a new job if the first's was
                    # claimed meanwhile; the checks below hold for every id returned
                    results.extend(source.call_many([entry, dict(entry, args={**args, "second": True})]))
        except BaseException as exc:
            errors.append(exc)

    returned: list[int] = []
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with running_worker(engine, model, {"work": queue}, name=f"race-{api}", threads=2):
            for round_no in range(rounds):
                results: list[int] = []
                threads = [
                    threading.Thread(target=caller, args=(results, i, round_no), daemon=True)
                    for i in range(callers)
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(30)
                assert not errors, errors
                assert len(results) == callers * (1 if api == "call" else 2)
                with Session(engine) as session:
                    states = dict(
                        session.execute(sa.select(Job.id, Job.state).where(Job.id.in_(results))).all()
                    )
                    on_cursor = set(session.scalars(sa.select(Job.id).where(Job.cursor_key == "k")))
                assert set(states) == set(results), "a returned id has no job"
                pending = {i for i, s in states.items() if s == JobStates.PENDING}
                assert len(pending) <= 1, f"round {round_no}: calls returned several pending jobs {pending}"
                # every other id returned was claimed meanwhile
                assert all(
                    s in (JobStates.RUNNING, JobStates.COMPLETED)
                    for i, s in states.items()
                    if i not in pending
                )
                returned.extend(results)
                # no call created a job that no caller was told about
                assert on_cursor <= set(returned), f"jobs nobody was returned: {on_cursor - set(returned)}"
            wait_until(lambda: _unfinished(engine, model) == 0)
    finally:
        stop_watch.set()
        watcher.join(10)
    assert watched["samples"] > 0
    assert watched["max_pending"] <= 1 and watched["max_holding"] <= 1, watched
    with queue.lock:
        ran = Counter(e[0] for e in queue.executions)
    assert set(ran) == set(returned) and all(n == 1 for n in ran.values())
    with Session(engine) as session:
        saved = session.get(model.JobCursor, "k")
        assert saved is not None and saved.properties == {"n": len(ran)}
    # the race did collapse: far fewer jobs than calls
    assert len(ran) < len(returned)


# -- regression: a stale claim snapshot lost cursor updates ------------------------------------------------------


def _autocommit_connection(engine: sa.Engine) -> Any:
    proxied = engine.raw_connection()
    conn = proxied.driver_connection
    proxied.detach()
    conn.autocommit = True
    return conn


def test_claim_hands_over_the_cursor_as_last_saved(engine: sa.Engine, model: Any) -> None:
    """A deterministic replay of the interleaving the stress tests hit at random.

    Worker 2's claim statement is held (by a test trigger) after it has chosen job
    B and before it writes it, as a descheduled backend would be. Meanwhile job A
    of the same cursor is queued and worker 1 claims. Before fbce567 worker 1 got
    A, ran and completed it, and B was then handed the cursor as it was before
    A's completion (a lost update). Either worker 1 must not get A while B's claim
    is in flight, or B must see what A saved.
    """
    queries = Queries.for_model(model)
    job_table = model.job_table.fullname
    lock_key = 0x5AFE
    w1, w2, control = (_autocommit_connection(engine) for _ in range(3))
    try:
        w1_id = liveness.register_worker(w1, queries, model.lock_class, "w1", ["work"])
        w2_id = liveness.register_worker(w2, queries, model.lock_class, "w2", ["work"])
        with control.cursor() as cur:
            cur.execute(
                "CREATE FUNCTION mq_test_hold_claim() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"PERFORM pg_advisory_lock_shared({lock_key}); PERFORM pg_advisory_unlock_shared({lock_key}); "
                "RETURN NEW; END $$"
            )
            cur.execute(
                f"CREATE TRIGGER mq_test_hold_claim BEFORE UPDATE ON {job_table} FOR EACH ROW "
                f"WHEN (OLD.state = 'pending' AND NEW.state = 'running' AND NEW.worker_id = {w2_id}) "
                "EXECUTE FUNCTION mq_test_hold_claim()"
            )
            cur.execute("SELECT pg_advisory_lock(%s)", (lock_key,))
        (job_b,) = _enqueue_one_by_one(
            engine,
            model,
            [{"queue": "work", "method": "b", "args": {}, "cursor_key": "k", "collapse_on_cursor": False}],
            1,
        )

        def claim(conn: Any, worker_id: int, out: list[Any]) -> None:
            rows = claim_jobs(
                conn, queries, lock_class=model.lock_class, worker_id=worker_id, queues=["work"], limit=1
            )
            out.extend(row[:9] for row in rows)

        def finish(conn: Any, job_id: int, cursor: dict[str, Any]) -> None:
            with conn.cursor() as cur:
                cur.execute(
                    queries.finish_job,
                    {
                        "id": job_id,
                        "attempt": 1,
                        "state": "completed",
                        "result": "{}",
                        "cursor": json.dumps(cursor),
                    },
                )
                assert cur.fetchone()[:2] == (1, 1)

        claimed_by_w2: list[Any] = []
        held = threading.Thread(target=claim, args=(w2, w2_id, claimed_by_w2), daemon=True)
        held.start()

        def w2_is_held() -> bool:
            with control.cursor() as cur:
                cur.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objid = %s",
                    (lock_key,),
                )
                return cur.fetchone()[0] == 1

        wait_until(w2_is_held, timeout=10)
        (job_a,) = _enqueue_one_by_one(
            engine,
            model,
            [{"queue": "work", "method": "a", "args": {}, "cursor_key": "k", "collapse_on_cursor": False}],
            1,
        )
        claimed_by_w1: list[Any] = []
        claim(w1, w1_id, claimed_by_w1)
        assert [row[0] for row in claimed_by_w1] in ([], [job_a])
        if claimed_by_w1:
            finish(w1, job_a, {"n": 1})
        with control.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock(%s)", (lock_key,))
        held.join(10)
        assert not held.is_alive()
        assert [row[0] for row in claimed_by_w2] == [job_b]
        # B is handed the cursor as last saved: by A if A completed meanwhile
        assert claimed_by_w2[0][8] == ({"n": 1} if claimed_by_w1 else {})
        if not claimed_by_w1:
            # A's turn comes after B's completion, and it sees what B saved
            finish(w2, job_b, {"n": 1})
            claim(w1, w1_id, claimed_by_w1)
            assert [(row[0], row[8]) for row in claimed_by_w1] == [(job_a, {"n": 1})]
    finally:
        with control.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock_all()")
            cur.execute(f"DROP TRIGGER IF EXISTS mq_test_hold_claim ON {job_table}")
            cur.execute("DROP FUNCTION IF EXISTS mq_test_hold_claim()")
        for conn in (w1, w2, control):
            conn.close()
