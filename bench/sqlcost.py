"""What one worker statement costs in PostgreSQL: ``python3 -m bench.sqlcost``.

For the library's claim and completion statements (read from
``psycopg2_mq._queries``, unchanged) and the raw baseline's claim, on a table
with ``--pending`` queued jobs and ``--finished`` completed ones:

* planning and execution time as EXPLAIN ANALYZE reports them (median);
* the client-side round trip (median) as the worker sends it today (plain
  statement: parsed and planned on every call), and as a prepared statement
  (``PREPARE`` once, ``EXECUTE``) with PostgreSQL's default plan cache mode and
  with ``plan_cache_mode = force_generic_plan``.

Each measured statement runs in a transaction that is rolled back, so the
table is the same for every repetition. A diagnostic for docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import psycopg2

from . import raw, scenarios
from .harness import Server, dsn, sql, vacuum_analyze


def to_positional(text: str, names: list[str]) -> str:
    """``%(name)s`` -> ``$n`` for PREPARE, and ``%%`` -> ``%``."""
    for k, name in enumerate(names, 1):
        text = text.replace(f"%({name})s", f"${k}")
    left = re.findall(r"%\(\w+\)s", text)
    if left:
        raise ValueError(f"unmapped parameters in statement: {left}")
    return text.replace("%%", "%")


def sql_type(value: Any) -> str:
    """The parameter type to PREPARE with, as psycopg2 would send ``value``."""
    if isinstance(value, list):
        return "text[]"
    if isinstance(value, int):
        return "int" if -(2**31) <= value < 2**31 else "bigint"
    return "text"  # JSON arrives as text and is cast in the statement


def timed(conn: Any, run: Callable[[Any], None], reps: int) -> float:
    """Median milliseconds of ``run(cursor)`` in a rolled-back transaction."""
    samples = []
    with conn.cursor() as cur:
        for _ in range(reps):
            t0 = time.perf_counter()
            run(cur)
            samples.append((time.perf_counter() - t0) * 1000)
            conn.rollback()
    return statistics.median(samples)


def explain(
    conn: Any, text: str, params: Any, reps: int, setup: Callable[[Any], Any] | None = None
) -> tuple[float, float]:
    """Median (planning ms, execution ms) from EXPLAIN ANALYZE."""
    plans, execs = [], []
    with conn.cursor() as cur:
        for _ in range(reps):
            p = setup(cur) if setup else params
            cur.execute("EXPLAIN (ANALYZE, SUMMARY, FORMAT JSON) " + text, p)
            out = cur.fetchone()[0][0]
            plans.append(out["Planning Time"])
            execs.append(out["Execution Time"])
            conn.rollback()
    return statistics.median(plans), statistics.median(execs)


def main() -> int:
    p = argparse.ArgumentParser(
        prog="python3 -m bench.sqlcost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--database-url", default=os.environ.get("MQ_DATABASE_URL"))
    p.add_argument("--pending", type=int, default=5000)
    p.add_argument("--finished", type=int, default=10_000)
    p.add_argument("--reps", type=int, default=200)
    args = p.parse_args()

    from psycopg2_mq._queries import Queries  # read-only: measure the library's own SQL

    q = Queries.for_model(scenarios._model())
    server = Server(args.database_url)
    try:
        url = server.fresh_db("sqlcost")
        scenarios.setup(url)
        raw.setup(url)
        scenarios.fill_finished(url, args.finished)
        scenarios.call_many(url, 0, args.pending)
        with contextlib.closing(psycopg2.connect(dsn(url))) as rconn:
            raw.insert_many(rconn, 0, args.pending, 1000)
        vacuum_analyze(url)
        worker_id = sql(
            url, "INSERT INTO mq_worker (name, host, pid, queues) VALUES ('x', 'x', 0, '[]') RETURNING id"
        )[0][0]
        conn = psycopg2.connect(dsn(url))
        rows = []

        model = scenarios._model()
        claim_names = scenarios.statement_params(q.claim_jobs, scenarios.claim_values(model, worker_id, 1))
        for limit in (1, 8):
            params = scenarios.claim_values(model, worker_id, limit)
            plan_ms, exec_ms = explain(conn, q.claim_jobs, params, 30)
            plain = timed(
                conn,
                lambda cur, params=params: (cur.execute(q.claim_jobs, params), cur.fetchall()),
                args.reps,
            )
            prepared = {}
            for mode in ("auto", "force_generic_plan"):
                with conn.cursor() as cur:
                    cur.execute(f"SET plan_cache_mode = {mode}")
                    cur.execute("DEALLOCATE ALL")
                    types = ", ".join(sql_type(params[name]) for name in claim_names)
                    cur.execute(f"PREPARE mq_claim({types}) AS " + to_positional(q.claim_jobs, claim_names))
                conn.commit()
                values = tuple(params[name] for name in claim_names)
                execute = "EXECUTE mq_claim(" + ", ".join(["%s"] * len(values)) + ")"
                prepared[mode] = timed(
                    conn,
                    lambda cur, e=execute, v=values: (cur.execute(e, v), cur.fetchall()),
                    args.reps,
                )
            rows.append(
                (
                    f"claim, limit {limit} (CLAIM_JOBS)",
                    plan_ms,
                    exec_ms,
                    plain,
                    prepared["auto"],
                    prepared["force_generic_plan"],
                )
            )

        # completion of one claimed job: claim in the same rolled-back transaction first
        def claim_one(cur: Any) -> dict[str, Any]:
            cur.execute(q.claim_jobs, scenarios.claim_values(model, worker_id, 1))
            row = cur.fetchone()
            attempt = row[[c.name for c in cur.description].index("attempts")]
            return {"id": row[0], "attempt": attempt, "state": "completed", "result": "null", "cursor": None}

        plan_ms, exec_ms = explain(conn, q.finish_job, None, 30, setup=claim_one)
        claim_only = timed(conn, lambda cur: claim_one(cur), args.reps)
        both = timed(conn, lambda cur: (cur.execute(q.finish_job, claim_one(cur)), cur.fetchall()), args.reps)
        rows.append(
            (
                "finish one job (FINISH_JOB), round trip = (claim+finish) - claim",
                plan_ms,
                exec_ms,
                both - claim_only,
                float("nan"),
                float("nan"),
            )
        )

        params = {"limit": 1}
        plan_ms, exec_ms = explain(conn, raw.CLAIM, params, 30)
        plain = timed(conn, lambda cur: (cur.execute(raw.CLAIM, params), cur.fetchall()), args.reps)
        rows.append(("raw baseline claim, limit 1", plan_ms, exec_ms, plain, float("nan"), float("nan")))
        conn.close()

        print(
            f"{args.pending:,} pending, {args.finished:,} finished rows; medians of {args.reps} round trips "
            "(each in a rolled-back transaction, so BEGIN/ROLLBACK add a little to every figure)"
        )
        print(
            "| statement | planning ms (EXPLAIN) | execution ms (EXPLAIN) | round trip ms, plain | "
            "prepared (auto) | prepared (generic) |"
        )
        print("|---|---|---|---|---|---|")
        for name, *vals in rows:
            print(f"| {name} | " + " | ".join("–" if v != v else f"{v:.2f}" for v in vals) + " |")
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
