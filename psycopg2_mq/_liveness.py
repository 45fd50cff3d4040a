"""Liveness: each worker holds an advisory lock; dead workers' jobs become lost.

The lock ``(model.lock_class, worker id)`` is a session-level advisory lock held
by the worker's dispatcher connection, the same connection it claims with.
PostgreSQL releases it the moment that session ends (the process was killed,
the connection dropped), so "is the lock held?" is an exact test of liveness
that needs no heartbeat and no clock skew. Any live worker runs
``mark_lost_jobs`` every maintenance interval; a worker's jobs are released once
its lock has been free for ``lost_after`` seconds (measured on the database
clock), which lets a worker that reconnects quickly keep them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterable
from typing import Any

from ._queries import Queries

log = logging.getLogger("psycopg2_mq.liveness")


def register_worker(
    conn: Any, queries: Queries, lock_class: int, name: str, queues: Iterable[str], worker_id: int | None = None
) -> int:
    """Register this worker and take its lock; returns the worker id.

    With ``worker_id`` (after a reconnect) it takes the same lock again if it
    can, so that jobs still running under that id are not given up; otherwise
    it registers anew.
    """
    me = {
        "name": name,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "queues": json.dumps(sorted(queues)),
        "lock_class": lock_class,
    }
    with conn.cursor() as cur:
        if worker_id is not None:
            cur.execute("SELECT pg_try_advisory_lock(%s, %s)", (lock_class, worker_id))
            row = cur.fetchone()
            if row is not None and row[0]:
                cur.execute(queries.rejoin_worker, {**me, "worker_id": worker_id})
                return worker_id
        cur.execute(queries.register_worker, me)
        row = cur.fetchone()
        assert row is not None
        return int(row[0])


def unregister_worker(conn: Any, queries: Queries, lock_class: int, worker_id: int) -> None:
    with conn.cursor() as cur:
        cur.execute(queries.unregister_worker, {"worker_id": worker_id, "lock_class": lock_class})


def mark_lost_jobs(conn: Any, queries: Queries, lock_class: int, lost_after: float) -> dict[str, str]:
    """Release the running jobs of workers dead for ``lost_after`` seconds, per their lost policy.

    Returns ``{job id: new state}`` (lost, pending for a retry, or failed).
    """
    with conn.cursor() as cur:
        cur.execute(queries.mark_lost_jobs, {"lock_class": lock_class, "lost_after": lost_after})
        row = cur.fetchone()
    released: dict[str, str] = row[0] if row else {}
    if released:
        log.warning("%d job(s) lost their worker: %s", len(released), released)
    return released


def release_orphaned_jobs(conn: Any, queries: Queries, worker_id: int, owned: list[int]) -> dict[str, str]:
    """Release this worker's running jobs that it does not hold (``owned``), per their lost policy."""
    with conn.cursor() as cur:
        cur.execute(queries.release_orphaned_jobs, {"worker_id": worker_id, "owned": owned})
        row = cur.fetchone()
    released: dict[str, str] = row[0] if row else {}
    if released:
        log.warning("worker %s had lost track of %d job(s): %s", worker_id, len(released), released)
    return released
