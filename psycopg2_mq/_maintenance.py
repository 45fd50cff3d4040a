"""The maintenance pass every worker runs each ``maintenance_interval``.

All of it is safe to run from many workers at once: each statement locks the
rows it changes with SKIP LOCKED, so two passes never act on the same job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import Any

from . import _liveness
from ._queries import Queries
from .model import JobStates

log = logging.getLogger("psycopg2_mq.maintenance")

#: rows deleted per statement when pruning: short statements, short locks
PRUNE_BATCH = 1000


def normalize_retention(prune_after: Mapping[str, float | timedelta] | None) -> dict[str, float]:
    """Validate ``{finished state: age}`` and turn ages into seconds."""
    if not prune_after:
        return {}
    retention: dict[str, float] = {}
    for state, age in prune_after.items():
        if state not in JobStates.FINISHED:
            raise ValueError(f"only finished jobs can be pruned ({', '.join(JobStates.FINISHED)}), not {state!r}")
        seconds = age.total_seconds() if isinstance(age, timedelta) else float(age)
        if seconds < 0:
            raise ValueError("a retention must not be negative")
        retention[state] = seconds
    return retention


def expire_timed_out_jobs(conn: Any, queries: Queries) -> dict[str, str]:
    """Retry or fail running attempts past their deadline; returns {job id: new state}."""
    with conn.cursor() as cur:
        cur.execute(queries.expire_jobs, {})  # with params, so that %% reads as %
        row = cur.fetchone()
    expired: dict[str, str] = row[0] if row else {}
    if expired:
        log.warning("%d job(s) ran past their timeout: %s", len(expired), expired)
    return expired


def prune_finished_jobs(conn: Any, queries: Queries, retention: Mapping[str, float], batch: int = PRUNE_BATCH) -> int:
    """Delete finished jobs older than their state's retention, batch by batch."""
    deleted = 0
    with conn.cursor() as cur:
        for state, age in retention.items():
            while True:
                cur.execute(queries.prune_jobs, {"state": state, "age": age, "batch": batch})
                deleted += cur.rowcount
                if cur.rowcount < batch:
                    break
    if deleted:
        log.info("pruned %d finished job(s)", deleted)
    return deleted


def run_maintenance(
    conn: Any,
    queries: Queries,
    lock_class: int,
    lost_after: float,
    retention: Mapping[str, float],
    worker_id: int,
    owned: Callable[[], AbstractContextManager[list[int]]],
) -> None:
    """One pass: orphaned and lost jobs, timed-out jobs, dead workers' rows, old finished jobs.

    ``owned()``: the ids of the jobs this worker holds (claimed and not yet
    written back), with no claim of its own in flight while the block runs;
    its other running jobs are orphans.
    """
    with owned() as ids:
        _liveness.release_orphaned_jobs(conn, queries, worker_id, ids)
    _liveness.mark_lost_jobs(conn, queries, lock_class, lost_after)
    expire_timed_out_jobs(conn, queries)
    with conn.cursor() as cur:
        cur.execute(queries.forget_dead_workers, {"lost_after": lost_after})
    if retention:
        prune_finished_jobs(conn, queries, retention)
