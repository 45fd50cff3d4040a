"""Our queue, driven through its public API exactly as a user would.

``MQSource.call`` / ``call_many`` in a SQLAlchemy ``Session`` to enqueue,
``MQWorker`` (in spawned processes) to run no-op jobs. The job function records
its start and end in the shared :class:`~bench.harness.Tracker`; every scenario
checks that each job ran exactly once and that the queue's own table shows it
completed, and raises :class:`~bench.harness.CheckFailed` otherwise.
"""

from __future__ import annotations

import contextlib
import random
import re
import threading
import time
from typing import Any

import psycopg2
import sqlalchemy as sa
from sqlalchemy.orm import Session

from .harness import (
    CheckFailed,
    Spec,
    Tracker,
    Workers,
    latency_summary,
    rss_kib,
    sql,
    tracked,
    url_str,
    vacuum_analyze,
)

QUEUE = "bench"
CHUNK = 1000  # calls per call_many statement


def _model() -> Any:
    from psycopg2_mq import make_default_model

    return make_default_model(sa.MetaData())


def _engine(url: sa.URL | str) -> sa.Engine:
    # the default QueuePool, as an application has: a Session returns its
    # connection to the pool on commit and reuses it for the next call
    return sa.create_engine(url, pool_size=2)


def setup(url: sa.URL) -> None:
    """Create the queue's tables (and triggers) in a fresh database."""
    engine = _engine(url)
    try:
        _model().metadata.create_all(engine)
    finally:
        engine.dispose()


def job_states(url: sa.URL) -> dict[str, int]:
    return {state: int(n) for state, n in sql(url, "SELECT state, count(*) FROM mq_job GROUP BY state")}


def check_enqueued(url: sa.URL, n: int) -> None:
    rows, distinct = sql(
        url, "SELECT count(*), count(DISTINCT (args->>'i')::int) FROM mq_job WHERE state = 'pending'"
    )[0]
    if rows != n or distinct != n:
        raise CheckFailed(f"enqueue: {rows} pending rows, {distinct} distinct jobs, expected {n}")


def check_completed(url: sa.URL, n: int, already: int = 0) -> None:
    """The table shows exactly ``n`` more completed jobs and nothing else left over."""
    states = job_states(url)
    completed = states.pop("completed", 0) - already
    if completed != n or states:
        raise CheckFailed(f"queue table: {completed} completed of {n}, other states {states}")
    # a job claimed twice shows attempts > 1, even if two runs raced on the tracker's counter
    twice = sql(url, "SELECT count(*) FROM mq_job WHERE attempts <> 1")[0][0]
    if twice:
        raise CheckFailed(f"queue table: {twice} job(s) were claimed more than once")


# -- enqueue ---------------------------------------------------------------------------------------


def enqueue_single(url: sa.URL, n: int) -> float:
    """Jobs/s: ``n`` × (``MQSource.call`` + COMMIT)."""
    from psycopg2_mq import MQSource

    model = _model()
    engine = _engine(url)
    try:
        with Session(engine) as session:
            source = MQSource(dbsession=session, model=model)
            t0 = time.perf_counter()
            for i in range(n):
                source.call(QUEUE, "noop", {"i": i})
                session.commit()
            seconds = time.perf_counter() - t0
    finally:
        engine.dispose()
    check_enqueued(url, n)
    return n / seconds


def call_many(url: sa.URL, start: int, stop: int, extra: dict[str, Any] | None = None) -> float:
    """Queue jobs ``start..stop-1`` with ``MQSource.call_many``, one statement and
    one transaction per ``CHUNK``; returns the seconds it took."""
    from psycopg2_mq import MQSource

    model = _model()
    engine = _engine(url)
    try:
        with Session(engine) as session:
            source = MQSource(dbsession=session, model=model)
            t0 = time.perf_counter()
            for a in range(start, stop, CHUNK):
                if extra:
                    source.call_many(
                        [
                            {"queue": QUEUE, "method": "noop", "args": {"i": i}, **extra}
                            for i in range(a, min(stop, a + CHUNK))
                        ]
                    )
                else:
                    source.call_many([(QUEUE, "noop", {"i": i}) for i in range(a, min(stop, a + CHUNK))])
                session.commit()
            return time.perf_counter() - t0
    finally:
        engine.dispose()


def enqueue_bulk(url: sa.URL, n: int) -> float:
    """Jobs/s: ``MQSource.call_many`` in chunks of ``CHUNK``."""
    seconds = call_many(url, 0, n)
    check_enqueued(url, n)
    return n / seconds


# -- the worker process -------------------------------------------------------------------------


class TrackingHandler:
    """The queue object: a no-op ``execute_job`` that records the run.

    With ``rss_marks`` it also reads VmRSS when the ``k``-th job of this
    process starts, for each ``k`` in the marks.
    """

    def __init__(self, tracker: Tracker, rss_marks: list[int] | None = None) -> None:
        self.tracker = tracker
        self.rss_marks = sorted(rss_marks or [])
        self.rss: dict[int, int] = {}
        self._seen = 0
        self._lock = threading.Lock()

    def execute_job(self, job: Any) -> None:
        i = job.args["i"]
        self.tracker.begin(i)
        if self.rss_marks:
            with self._lock:
                self._seen += 1
                if self._seen in self.rss_marks:
                    self.rss[self._seen] = rss_kib()
        self.tracker.end(i)


def worker_main(spec: Spec, tracker: Tracker, ready: Any, go: Any, stop: Any) -> dict[str, Any]:
    """One ``MQWorker(threads=spec.threads)``; runs from ``go`` until ``stop``."""
    from psycopg2_mq import MQWorker

    model = _model()
    engine = _engine(spec.url)
    handler = TrackingHandler(tracker, spec.options.get("rss_marks"))
    worker = MQWorker(
        engine=engine,
        queues={QUEUE: handler},
        model=model,
        threads=spec.threads,
        name=f"bench-{spec.options.get('n', 0)}",
    )
    rss_ready = rss_kib()
    ready.set()
    go.wait()

    def stopper() -> None:
        stop.wait()
        worker.shutdown_gracefully()

    threading.Thread(target=stopper, daemon=True).start()
    worker.run()
    engine.dispose()
    return {"rss": handler.rss, "rss_ready": rss_ready}


def _start(url: sa.URL, tracker: Tracker, threads: int, processes: int = 1, **options: Any) -> Workers:
    specs = [
        Spec(url_str(url), tracker.path, tracker.n, threads=threads, options={"n": k, **options})
        for k in range(processes)
    ]
    workers = Workers(worker_main, specs)
    workers.start()
    return workers


# -- drain and latency ------------------------------------------------------------------------------


def drain(url: sa.URL, n: int, threads: int, processes: int = 1, already_completed: int = 0) -> float:
    """Jobs/s: ``n`` pre-queued no-op jobs, workers released together; ends when the
    last job's ``execute_job`` returns."""
    call_many(url, 0, n)
    vacuum_analyze(url)
    with tracked(n) as tracker:
        workers = _start(url, tracker, threads, processes)
        t0 = workers.go()
        try:
            tracker.wait_done(n, timeout=900, alive=workers.alive)
            t_end = tracker.last_end()
        finally:
            workers.stop()
        tracker.check_exactly_once()
    check_completed(url, n, already_completed)
    return n / (t_end - t0)


def pickup_latency(
    url: sa.URL, probes: int, warmup: int = 5, seed: int = 1, already_completed: int = 0
) -> dict[str, float]:
    """An idle ``MQWorker(threads=1)``; jobs queued one at a time with ``call`` + COMMIT,
    5–25 ms apart: COMMIT returned → ``execute_job`` started, in ms."""
    from psycopg2_mq import MQSource

    n = probes + warmup
    rnd = random.Random(seed)
    model = _model()
    engine = _engine(url)
    lat: list[float] = []
    with tracked(n) as tracker:
        workers = _start(url, tracker, threads=1)
        workers.go()
        try:
            time.sleep(0.3)  # let the worker register, LISTEN and go idle
            with Session(engine) as session:
                source = MQSource(dbsession=session, model=model)
                for i in range(n):
                    source.call(QUEUE, "noop", {"i": i})
                    session.commit()
                    committed = time.monotonic()
                    tracker.wait_one(i, timeout=30)
                    if i >= warmup:
                        lat.append(tracker.start(i) - committed)
                    time.sleep(rnd.uniform(0.005, 0.025))
            tracker.wait_done(n, timeout=30)
        finally:
            workers.stop()
            engine.dispose()
        tracker.check_exactly_once()
    check_completed(url, n, already_completed)
    return latency_summary(lat)


def cursor_chain(url: sa.URL, n: int, threads: int = 4) -> dict[str, float]:
    """``n`` jobs queued on ONE cursor with ``collapse_on_cursor=False`` (so they wait
    their turn), then one ``MQWorker(threads)``: the gap from one job's end to the
    next one's start, in ms. Also checks that no two ever overlapped."""
    call_many(url, 0, n, {"cursor_key": "chain", "collapse_on_cursor": False})
    vacuum_analyze(url)
    with tracked(n) as tracker:
        workers = _start(url, tracker, threads)
        workers.go()
        try:
            tracker.wait_done(n, timeout=300, alive=workers.alive)
        finally:
            workers.stop()
        tracker.check_exactly_once()
        runs = sorted((tracker.start(i), tracker.finish(i)) for i in range(n))
    gaps = [start - prev_end for (_, prev_end), (start, _) in zip(runs, runs[1:], strict=False)]
    overlaps = sum(1 for g in gaps if g < 0)
    if overlaps:
        raise CheckFailed(
            f"cursor chain: {overlaps} job(s) started before the previous one on the cursor ended"
        )
    check_completed(url, n)
    return latency_summary(gaps)


# -- table size ----------------------------------------------------------------------------------------

FILL_FINISHED = """
INSERT INTO mq_job (queue, method, args, result, state, cursor_key, collapsible,
                    created_time, scheduled_time, start_time, end_time, worker_id, attempts)
SELECT %(queue)s, 'noop', jsonb_build_object('old', g), 'null'::jsonb, 'completed',
       -- half the history has cursor keys, as in an application that uses cursors
       CASE WHEN g %% 2 = 0 THEN 'hist-' || (g %% 10000) END, true,
       now() - interval '1 day', now() - interval '1 day', now() - interval '1 day',
       now() - interval '1 day', 1, 1
FROM generate_series(1, %(rows)s) AS g
"""


def fill_finished(url: sa.URL, rows: int) -> float:
    """Add ``rows`` completed jobs with one INSERT … SELECT generate_series, then
    VACUUM ANALYZE; returns the seconds it took."""
    t0 = time.perf_counter()
    sql(url, FILL_FINISHED, {"queue": QUEUE, "rows": rows})
    vacuum_analyze(url)
    # write the fill's dirty pages out now, so that no checkpoint triggered by
    # them runs during the measurement (needs superuser or pg_checkpoint)
    with contextlib.suppress(psycopg2.Error):
        sql(url, "CHECKPOINT")
    return time.perf_counter() - t0


def statement_params(text: str, known: dict[str, Any]) -> list[str]:
    """The ``%(name)s`` parameters of a statement, in order of first use; fails on
    one this benchmark does not know how to fill (the library added one)."""
    names = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", text)))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise CheckFailed(f"the claim statement takes parameters this benchmark does not fill: {unknown}")
    return names


def claim_values(model: Any, worker_id: int, limit: int) -> dict[str, Any]:
    """Values for every parameter the library's claim statement has taken so far."""
    return {
        "queues": [QUEUE],
        "limit": limit,
        "worker_id": worker_id,
        "policies": "{}",
        "lock_class": model.lock_class,
    }


def explain_claim(url: sa.URL, limit: int = 4, pending: int = 100) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of the worker's claim statement, in a rolled-back
    transaction, after queueing ``pending`` jobs (so that it has something to claim)."""
    from psycopg2_mq._queries import Queries  # read-only use, to show the library's own SQL

    from .harness import dsn

    model = _model()
    text = Queries.for_model(model).claim_jobs
    known = claim_values(model, 0, limit)
    statement_params(text, known)
    call_many(url, 10**9, 10**9 + pending)  # job numbers out of any tracker's range
    conn = psycopg2.connect(dsn(url))
    try:
        with conn.cursor() as cur:
            cur.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + text, known)
            plan = "\n".join(r[0] for r in cur.fetchall())
        conn.rollback()
        return plan
    finally:
        conn.close()


# -- memory ----------------------------------------------------------------------------------------------


def worker_rss(url: sa.URL, marks: list[int], threads: int = 4, feed: int = 20000) -> dict[int, int]:
    """VmRSS (KiB) of one worker process when its k-th job starts, for k in ``marks``.

    Jobs are fed in slices of ``feed`` while it runs, so the pending set stays
    small and the figure is the worker's own growth, not a huge backlog's.
    """
    n = max(marks)
    call_many(url, 0, min(feed, n))
    vacuum_analyze(url)
    with tracked(n) as tracker:
        workers = _start(url, tracker, threads, rss_marks=marks)
        workers.go()
        queued = min(feed, n)
        try:
            while queued < n:
                # keep about one slice ahead of the worker
                tracker.wait_done(max(queued - feed // 2, 0), timeout=900, alive=workers.alive)
                nxt = min(queued + feed, n)
                call_many(url, queued, nxt)
                queued = nxt
            tracker.wait_done(n, timeout=900, alive=workers.alive)
        finally:
            results = workers.stop()
        tracker.check_exactly_once()
    check_completed(url, n)
    rss = {int(k): v for k, v in results[0]["rss"].items()}
    if sorted(rss) != sorted(marks):
        raise CheckFailed(f"worker rss: marks {sorted(rss)} recorded, expected {sorted(marks)}")
    return rss
