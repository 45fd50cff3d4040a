"""Fault 4: load with random failures and retries, 8 worker processes x 2 threads.

Failures are deterministic per (job id, attempt) (see ``worker_main``), so the
test knows exactly which jobs must end failed: those whose every attempt drew
a failure. Everything else must be completed once, with one error kept per
failed attempt, and no cursor may ever run two jobs at once.
"""

from __future__ import annotations

import zlib
from typing import Any

import pytest
import sqlalchemy as sa

from psycopg2_mq import Backoff

from .helpers import WorkerFleet, check_drain, drain

JOBS = 20_000
CURSORS = 200
FAIL_PCT = 20
MAX_ATTEMPTS = 3


def _fails(job_id: int, attempt: int) -> bool:
    return zlib.crc32(f"{job_id}:{attempt}".encode()) % 100 < FAIL_PCT


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_load_with_random_failures_and_retries(
    engine: sa.Engine, model: Any, fleet: WorkerFleet, exec_log: str
) -> None:
    report = drain(
        engine,
        model,
        fleet,
        jobs=JOBS,
        cursors=CURSORS,
        workers=8,
        threads=2,
        job_args={"fail_pct": FAIL_PCT},
        call={"max_attempts": MAX_ATTEMPTS, "backoff": Backoff(base=0.02, cap=0.2)},
        timeout=360,
        worker_options={"pre_ping": False},  # no connection faults here
    )
    print(f"\n{report.summary()}; {JOBS / report.seconds:.0f} jobs/s")
    doomed = {i for i in report.job_ids if all(_fails(i, a) for a in range(1, MAX_ATTEMPTS + 1))}
    check_drain(report, expect_failed=doomed)
    # all attempts accounted for: each job ran exactly until its first success (or out of attempts)
    for job_id, job in report.jobs.items():
        expected = next((a for a in range(1, MAX_ATTEMPTS + 1) if not _fails(job_id, a)), MAX_ATTEMPTS)
        assert job["attempts"] == expected, (job_id, job)
        assert [e["attempt"] for e in job["errors"] or []] == list(
            range(1, expected if job_id not in doomed else MAX_ATTEMPTS)
        )
        if job_id in doomed:
            assert (
                job["result"]["error"]["message"]
                == f"injected failure of job {job_id} attempt {MAX_ATTEMPTS}"
            )
    runs = sorted((e.job_id, e.attempt) for e in report.execs)
    assert runs == sorted((i, a) for i, job in report.jobs.items() for a in range(1, job["attempts"] + 1))
    completed = sum(s["completed_jobs"] for s in report.statuses)
    failed = sum(s["failed_jobs"] for s in report.statuses)
    retried = sum(s["retried_jobs"] for s in report.statuses)
    assert (completed, failed) == (JOBS - len(doomed), len(doomed))
    assert retried == sum(job["attempts"] - 1 for job in report.jobs.values())
    assert sum(s["discarded_outcomes"] for s in report.statuses) == 0
