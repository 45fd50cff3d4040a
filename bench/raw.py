"""The baseline: the least a PostgreSQL queue must do, in plain psycopg2.

A minimal table with a partial index on pending rows, and:

* ``enqueue_single``: one ``INSERT`` + ``NOTIFY`` per transaction;
* ``enqueue_multirow``: one multi-row ``INSERT`` of ``batch`` rows (+ one NOTIFY) per transaction;
* ``drain_worker``: ``UPDATE … WHERE id = (SELECT … FOR UPDATE SKIP LOCKED LIMIT 1)
  RETURNING``, run the job, COMMIT: one job per transaction; with ``batch > 1``
  the same statement claims ``batch`` rows and commits once per batch;
* ``latency_worker``: the one-row loop, sleeping in ``select()`` on LISTEN when idle.

It has no cursors, no retries, no liveness and no results: it is the
physical limit the queue is compared with, measured in the same run.
"""

from __future__ import annotations

import contextlib
import random
import select
import time
from typing import Any

import psycopg2
import psycopg2.extras
import sqlalchemy as sa

from .harness import (
    CheckFailed,
    Spec,
    Tracker,
    Workers,
    dsn,
    latency_summary,
    sql,
    tracked,
    url_str,
    vacuum_analyze,
)

CHANNEL = "raw_jobs"

SCHEMA = """
CREATE TABLE raw_job (
    id bigserial PRIMARY KEY,
    args jsonb NOT NULL,
    state text NOT NULL DEFAULT 'pending',
    created_time timestamptz NOT NULL DEFAULT now(),
    end_time timestamptz
);
CREATE INDEX raw_job_pending ON raw_job (id) WHERE state = 'pending';
"""

# One statement claims and finishes: the row stays locked by this transaction
# until COMMIT, so a crash before COMMIT leaves it pending (1 commit per job).
CLAIM = """
UPDATE raw_job SET state = 'done', end_time = now()
WHERE id = ANY(ARRAY(
    SELECT id FROM raw_job WHERE state = 'pending' ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED))
RETURNING id, args
"""


def setup(url: sa.URL) -> None:
    sql(url, SCHEMA)


def _connect(url: str) -> Any:
    return psycopg2.connect(dsn(sa.make_url(url)))


def count_done(url: sa.URL) -> tuple[int, int, int]:
    """(rows, rows done, distinct job numbers) in the raw table."""
    row = sql(
        url,
        "SELECT count(*), count(*) FILTER (WHERE state = 'done'), count(DISTINCT (args->>'i')::int) FROM raw_job",
    )[0]
    return int(row[0]), int(row[1]), int(row[2])


def check_enqueued(url: sa.URL, n: int) -> None:
    rows, _, distinct = count_done(url)
    if rows != n or distinct != n:
        raise CheckFailed(f"raw enqueue: {rows} rows, {distinct} distinct jobs, expected {n}")


# -- enqueue ------------------------------------------------------------------------------------


def enqueue_single(url: sa.URL, n: int) -> float:
    """Jobs/s for ``n`` one-row INSERT + NOTIFY transactions."""
    with contextlib.closing(_connect(url_str(url))) as conn, conn.cursor() as cur:
        t0 = time.perf_counter()
        for i in range(n):
            cur.execute(
                f"INSERT INTO raw_job (args) VALUES (%s); NOTIFY {CHANNEL}", (psycopg2.extras.Json({"i": i}),)
            )
            conn.commit()
        seconds = time.perf_counter() - t0
    check_enqueued(url, n)
    return n / seconds


def insert_many(conn: Any, start: int, stop: int, batch: int) -> None:
    """Multi-row INSERTs of ``batch`` rows, one transaction (and one NOTIFY) each."""
    with conn.cursor() as cur:
        for a in range(start, stop, batch):
            rows = [(psycopg2.extras.Json({"i": i}),) for i in range(a, min(stop, a + batch))]
            psycopg2.extras.execute_values(cur, "INSERT INTO raw_job (args) VALUES %s", rows, page_size=batch)
            cur.execute(f"NOTIFY {CHANNEL}")
            conn.commit()


def enqueue_multirow(url: sa.URL, n: int, batch: int = 1000) -> float:
    """Jobs/s for ``n`` jobs inserted ``batch`` rows per statement and transaction."""
    with contextlib.closing(_connect(url_str(url))) as conn:
        t0 = time.perf_counter()
        insert_many(conn, 0, n, batch)
        seconds = time.perf_counter() - t0
    check_enqueued(url, n)
    return n / seconds


# -- workers (run in spawned processes) --------------------------------------------------------


def drain_worker(spec: Spec, tracker: Tracker, ready: Any, go: Any, stop: Any) -> None:
    """Claim-run-commit until the table has no pending row left."""
    limit = spec.options.get("batch", 1)
    conn = _connect(spec.url)
    ready.set()
    go.wait()
    with contextlib.closing(conn), conn.cursor() as cur:
        while not stop.is_set():
            cur.execute(CLAIM, {"limit": limit})
            rows = cur.fetchall()
            for _, args in rows:
                i = args["i"]
                tracker.begin(i)
                tracker.end(i)
            conn.commit()
            if not rows:
                break


def latency_worker(spec: Spec, tracker: Tracker, ready: Any, go: Any, stop: Any) -> None:
    """The one-row loop; when idle it blocks in select() until a NOTIFY."""
    conn = _connect(spec.url)
    with conn.cursor() as cur:
        cur.execute(f"LISTEN {CHANNEL}")
    conn.commit()
    ready.set()
    go.wait()
    with contextlib.closing(conn), conn.cursor() as cur:
        while not stop.is_set():
            cur.execute(CLAIM, {"limit": 1})
            row = cur.fetchone()
            if row is not None:
                tracker.begin(row[1]["i"])
                tracker.end(row[1]["i"])
            conn.commit()
            if row is not None:
                continue
            if conn.notifies:  # arrived with the last statement: look again at once
                conn.notifies.clear()
                continue
            select.select([conn], [], [], 0.2)
            conn.poll()
            conn.notifies.clear()


# -- scenarios -------------------------------------------------------------------------------------


def drain(url: sa.URL, n: int, processes: int, batch: int) -> float:
    """Jobs/s: ``n`` pre-queued jobs, ``processes`` one-connection workers, released at once."""
    with contextlib.closing(_connect(url_str(url))) as conn:
        insert_many(conn, 0, n, 1000)
    vacuum_analyze(url)
    with tracked(n) as tracker:
        specs = [Spec(url_str(url), tracker.path, n, options={"batch": batch}) for _ in range(processes)]
        workers = Workers(drain_worker, specs)
        workers.start()
        t0 = workers.go()
        try:
            tracker.wait_done(n, timeout=600, alive=workers.alive)
            t_end = tracker.last_end()
        finally:
            workers.stop()
        tracker.check_exactly_once()
    rows, done, distinct = count_done(url)
    if (rows, done, distinct) != (n, n, n):
        raise CheckFailed(f"raw drain: table shows {done}/{rows} done, {distinct} distinct (expected {n})")
    return n / (t_end - t0)


def pickup_latency(url: sa.URL, probes: int, warmup: int = 5, seed: int = 1) -> dict[str, float]:
    """Commit of a one-row INSERT+NOTIFY → the idle worker starts the job (ms)."""
    n = probes + warmup
    rnd = random.Random(seed)
    with tracked(n) as tracker:
        workers = Workers(latency_worker, [Spec(url_str(url), tracker.path, n)])
        workers.start()
        workers.go()
        lat: list[float] = []
        try:
            time.sleep(0.3)  # let the worker reach its idle select()
            with contextlib.closing(_connect(url_str(url))) as conn, conn.cursor() as cur:
                for i in range(n):
                    cur.execute(
                        f"INSERT INTO raw_job (args) VALUES (%s); NOTIFY {CHANNEL}",
                        (psycopg2.extras.Json({"i": i}),),
                    )
                    conn.commit()
                    committed = time.monotonic()
                    tracker.wait_one(i, timeout=30)
                    if i >= warmup:
                        lat.append(tracker.start(i) - committed)
                    time.sleep(rnd.uniform(0.005, 0.025))
            tracker.wait_done(n, timeout=30)
        finally:
            workers.stop()
        tracker.check_exactly_once()
    return latency_summary(lat)
