"""Fault 1: a worker process is SIGKILLed in the middle of a job.

PostgreSQL ends the dead worker's session, which releases its liveness lock;
the next maintenance pass of any live worker then applies the job's lost
policy. The time from the kill to the release is printed (database clock).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from psycopg2_mq import MQSource

from .helpers import (
    EXEC_LOG,
    WorkerFleet,
    db_now,
    enqueue,
    executions,
    job_row,
    wait_for_state,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

MAINTENANCE = 1.0


def _running_on(engine: sa.Engine, job_id: int, worker_id: int) -> bool:
    row = job_row(engine, job_id)
    return row["state"] == "running" and row["worker_id"] == worker_id


def _start_doomed_job(
    engine: sa.Engine, model: Any, fleet: WorkerFleet, gate: Path, **call: Any
) -> tuple[Any, int]:
    """Worker 'a' alone claims a job that blocks on its gate; returns (a, job id)."""
    a = fleet.start("a", ["kill"], maintenance_interval=MAINTENANCE, log_table=EXEC_LOG)
    a_id = a.wait_registered(engine)
    job_id = enqueue(engine, model, "kill", "m", {"gate": str(gate), "gate_per_attempt": True}, **call)
    wait_until(lambda: _running_on(engine, job_id, a_id))
    return a, job_id


def _seconds(since: datetime, iso: str) -> float:
    return (datetime.fromisoformat(iso) - since).total_seconds()


def test_sigkill_with_retry_policy_reruns_the_job_on_another_worker(
    engine: sa.Engine, model: Any, fleet: WorkerFleet, exec_log: str, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    a, job_id = _start_doomed_job(
        engine, model, fleet, gate, lost_policy="retry", max_attempts=2, cursor_key="k"
    )
    b = fleet.start("b", ["kill"], maintenance_interval=MAINTENANCE, log_table=EXEC_LOG)
    b.wait_registered(engine)
    (tmp_path / "gate.2").touch()  # the second attempt may finish; the first never will
    killed_at = db_now(engine)
    a.kill()

    job = wait_for_state(engine, job_id, "completed", "failed")
    lost_after = _seconds(killed_at, job["errors"][0]["end_time"])
    print(f"\nSIGKILL -> job released for retry: {lost_after:.3f}s (maintenance_interval={MAINTENANCE}s)")
    assert job["state"] == "completed"
    assert job["attempts"] == 2
    assert job["result"] == {"pid": b.pid, "attempt": 2, "log_id": job["result"]["log_id"]}
    assert [(e["type"], e["attempt"]) for e in job["errors"]] == [("LostJob", 1)]
    runs = [(e.attempt, e.pid, e.outcome) for e in executions(engine)]
    assert runs == [(1, a.pid, None), (2, b.pid, "ok")]  # the killed run never ended
    assert b.alive()


@pytest.mark.parametrize("resolution", ["retry_job", "fail_lost_job"])
def test_sigkill_with_hold_policy_keeps_the_job_lost_and_its_cursor_blocked(
    engine: sa.Engine, model: Any, fleet: WorkerFleet, exec_log: str, tmp_path: Path, resolution: str
) -> None:
    gate = tmp_path / "gate"
    a, doomed = _start_doomed_job(
        engine, model, fleet, gate, lost_policy="hold", max_attempts=3, cursor_key="k"
    )
    waiting = enqueue(engine, model, "kill", "next", {}, cursor_key="k", collapse_on_cursor=False)
    b = fleet.start("b", ["kill"], maintenance_interval=MAINTENANCE, log_table=EXEC_LOG)
    b.wait_registered(engine)
    killed_at = db_now(engine)
    a.kill()
    lost = wait_for_state(engine, doomed, "lost")
    print(
        f"\nSIGKILL -> job lost: {(lost['end_time'] - killed_at).total_seconds():.3f}s "
        f"(maintenance_interval={MAINTENANCE}s)"
    )
    assert lost["result"] is None and lost["attempts"] == 1  # hold ignores max_attempts: an operator decides

    # b stops; c does no maintenance and no polling of its own for an hour, so
    # whatever it runs from now on it was woken for by a NOTIFY
    assert b.stop() == 0
    c = fleet.start("c", ["kill"], maintenance_interval=3600, poll_interval=3600, log_table=EXEC_LOG)
    c.wait_registered(engine)
    sentinel = enqueue(engine, model, "kill", "sentinel", {})
    wait_for_state(engine, sentinel, "completed")  # c is claiming...
    assert job_row(engine, waiting)["state"] == "pending"  # ...but the lost job holds the cursor

    with Session(engine) as session:
        mq = MQSource(dbsession=session, model=model)
        blocked = mq.blocked_cursors()
        assert [(b["cursor_key"], b["job_id"], b["state"], b["waiting"]) for b in blocked] == [
            ("k", doomed, "lost", 1)
        ]
        reasons = mq.explain_job(waiting)["reasons"]
        assert reasons == [f"its cursor 'k' is held by job {doomed} (lost)"]

    (tmp_path / "gate.1").touch()  # a retried call runs as a new job, attempt 1
    with Session(engine) as session, session.begin():
        mq = MQSource(dbsession=session, model=model)
        retry_id = mq.retry_job(doomed).id if resolution == "retry_job" else None
        if resolution == "fail_lost_job":
            mq.fail_lost_job(doomed)
    assert job_row(engine, doomed)["state"] == "failed"
    for job_id in [waiting] + ([retry_id] if retry_id else []):
        done = wait_for_state(engine, job_id, "completed", "failed")
        assert done["state"] == "completed"
    assert [e.pid for e in executions(engine) if e.job_id == waiting] == [c.pid]


def test_sigkill_with_fail_policy_fails_the_job_and_frees_its_cursor(
    engine: sa.Engine, model: Any, fleet: WorkerFleet, exec_log: str, tmp_path: Path
) -> None:
    a, doomed = _start_doomed_job(
        engine, model, fleet, tmp_path / "gate", lost_policy="fail", max_attempts=5, cursor_key="k"
    )
    waiting = enqueue(engine, model, "kill", "next", {}, cursor_key="k", collapse_on_cursor=False)
    b = fleet.start("b", ["kill"], maintenance_interval=MAINTENANCE, log_table=EXEC_LOG)
    b.wait_registered(engine)
    a.kill()
    failed = wait_for_state(engine, doomed, "failed", "lost", "pending")
    assert failed["state"] == "failed"
    assert failed["result"]["error"]["type"] == "LostJob"
    assert failed["attempts"] == 1  # 'fail' does not retry, whatever max_attempts says
    assert wait_for_state(engine, waiting, "completed", "failed")["state"] == "completed"
