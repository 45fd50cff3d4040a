"""Claiming: taking due jobs for a worker, and knowing when the next one is due.

The SQL and why it is safe under concurrency are in ``_queries.CLAIM_JOBS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg2.errors

from ._queries import Queries

#: how often a claim that lost a race on a cursor is tried again at once
CLAIM_RETRIES = 5
#: positions in a claimed row (CLAIM_JOBS' RETURNING)
CURSOR_KEY, CURSOR = 4, 8


def prepare(conn: Any, queries: Queries) -> None:
    """Prepare the claim on the dispatcher's own connection.

    The claim is a large statement: parsing it on every wake-up costs more than
    running it. Prepared once per connection, a claim is one short EXECUTE.
    """
    # The generic plan: planning the claim for its parameters took longer than
    # running it, and PostgreSQL's own choice keeps re-planning it. The plan is
    # the same whatever the parameters (the claim index in order, the primary
    # key for the update); see CLAIM_JOBS.
    with conn.cursor() as cur:
        cur.execute(queries.claim_jobs_prepared.prepare)
        cur.execute("SET plan_cache_mode = force_generic_plan")


def claim_jobs(
    conn: Any,
    queries: Queries,
    *,
    lock_class: int,
    worker_id: int,
    queues: Sequence[str],
    limit: int,
    policies: str = "{}",
    prepared: bool = False,
) -> list[tuple[Any, ...]]:
    """Claim up to ``limit`` due jobs of ``queues`` for ``worker_id``; one statement.

    ``conn`` is the autocommit connection that holds the worker's liveness
    lock. ``policies`` is JSON ``{queue: {max_attempts, lost, timeout}}``, the
    queues' defaults written onto jobs that set none. Returns the claimed rows
    (see ``_executor.job_from_row``) with their cursors' data, read by a second
    statement when any has a cursor (see ``_queries.READ_CURSORS`` for why).
    With ``prepared``, runs the statement ``prepare`` made on ``conn``.
    """
    params = {
        "queues": list(queues),
        "limit": limit,
        "worker_id": worker_id,
        "policies": policies,
        "lock_class": lock_class,
    }
    rows: list[tuple[Any, ...]] = []
    for _ in range(CLAIM_RETRIES):
        try:
            with conn.cursor() as cur:
                if prepared:
                    cur.execute(queries.claim_jobs_prepared.execute, params)
                else:
                    cur.execute(queries.claim_jobs, params)
                rows = cur.fetchall()
            break
        except (psycopg2.errors.UniqueViolation, psycopg2.errors.DeadlockDetected):
            # a claim from a stale snapshot raced onto a busy cursor: the unique
            # index kept the rule and refused it; claim again
            continue
    keys = [row[CURSOR_KEY] for row in rows if row[CURSOR_KEY] is not None]
    if not keys:
        return rows
    with conn.cursor() as cur:
        cur.execute(queries.read_cursors, {"keys": keys})
        data = dict(cur.fetchall())
    return [
        row if row[CURSOR_KEY] is None else (*row[:CURSOR], data.get(row[CURSOR_KEY], {}), *row[CURSOR + 1 :])
        for row in rows
    ]


def seconds_until_next_job(conn: Any, queries: Queries, queues: Sequence[str]) -> float | None:
    """Seconds until a job of ``queues`` may be claimed (<= 0: due now), or None."""
    with conn.cursor() as cur:
        cur.execute(queries.seconds_until_next_job, {"queues": list(queues)})
        row = cur.fetchone()
    return None if row is None or row[0] is None else float(row[0])
