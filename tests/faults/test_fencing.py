"""Fault 2: a worker presumed dead comes back; its late outcome must be fenced off.

The claim's attempt number is the fencing token: completion, failure, retry
and the cursor write all match only ``state = 'running' AND attempts = <token>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from .helpers import (
    EXEC_LOG,
    WorkerFleet,
    count_lines,
    dispatcher_backend,
    enqueue,
    executions,
    job_row,
    terminate,
    wait_for_state,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)


def _cursor(engine: sa.Engine, key: str) -> Any:
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT properties FROM mq_cursor WHERE key = %(k)s", {"k": key}).scalar()


def test_sigstopped_worker_cannot_overwrite_the_rerun_after_sigcont(
    engine: sa.Engine, model: Any, fleet: WorkerFleet, exec_log: str, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    a = fleet.start("a", ["fence"], maintenance_interval=1.0, log_table=EXEC_LOG)
    a_id = a.wait_registered(engine)
    job_id = enqueue(
        engine,
        model,
        "fence",
        "m",
        {"gate": str(gate), "gate_per_attempt": True, "cursor_mark": True},
        cursor_key="z",
        lost_policy="retry",
        max_attempts=2,
    )
    wait_until(lambda: job_row(engine, job_id)["worker_id"] == a_id)
    b = fleet.start("b", ["fence"], maintenance_interval=0.5, log_table=EXEC_LOG)
    b.wait_registered(engine)

    a.pause()
    # while a is stopped its session, and so its lock, are alive: nobody may take its job
    backend = dispatcher_backend(engine, model.lock_class, a_id)
    assert backend is not None
    assert job_row(engine, job_id)["state"] == "running"
    # cut a's dispatcher connection: PostgreSQL releases the lock, a looks dead
    assert terminate(engine, [backend]) == 1
    (tmp_path / "gate.2").touch()
    second = wait_for_state(engine, job_id, "completed", "failed")
    assert second["state"] == "completed"
    assert second["result"]["pid"] == b.pid and second["attempts"] == 2
    assert _cursor(engine, "z") == {"pid": b.pid, "attempt": 2}

    # a comes back and finishes attempt 1: its outcome and cursor write are refused
    (tmp_path / "gate.1").touch()
    a.resume()
    wait_until(lambda: count_lines(a.log(), "outcome discarded") == 1)
    wait_until(lambda: count_lines(a.log(), "reconnected after") == 1)
    final = job_row(engine, job_id)
    assert (final["state"], final["attempts"], final["result"]) == ("completed", 2, second["result"])
    assert final["end_time"] == second["end_time"]
    assert _cursor(engine, "z") == {"pid": b.pid, "attempt": 2}
    runs = sorted((e.attempt, e.pid, e.outcome) for e in executions(engine))
    assert runs == [(1, a.pid, "ok"), (2, b.pid, "ok")]  # a's run did finish, and was discarded
    assert a.alive() and b.alive()
    # a is a working worker again
    after = enqueue(engine, model, "fence", "after", {})
    assert wait_for_state(engine, after, "completed")["state"] == "completed"
    assert a.stop() == 0 and b.stop() == 0


def test_timed_out_attempt_is_rerun_and_its_late_outcome_discarded(
    engine: sa.Engine, model: Any, fleet: WorkerFleet, exec_log: str, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    a = fleet.start("a", ["slow"], threads=2, maintenance_interval=0.2, log_table=EXEC_LOG)
    a.wait_registered(engine)
    job_id = enqueue(
        engine,
        model,
        "slow",
        "m",
        {"gate": str(gate), "gate_per_attempt": True, "cursor_mark": True},
        cursor_key="t",
        timeout=1.0,
        max_attempts=2,
    )
    waiting = enqueue(engine, model, "slow", "next", {}, cursor_key="t", collapse_on_cursor=False)
    (tmp_path / "gate.2").touch()
    second = wait_for_state(engine, job_id, "completed", "failed")
    assert second["state"] == "completed" and second["attempts"] == 2
    assert [(e["type"], e["attempt"]) for e in second["errors"]] == [("JobTimeout", 1)]
    assert wait_for_state(engine, waiting, "completed")["state"] == "completed"
    # attempt 1 is still running in its thread: Python cannot stop it
    runs = [(e.attempt, e.ended is None) for e in executions(engine) if e.job_id == job_id]
    assert runs == [(1, True), (2, False)]

    (tmp_path / "gate.1").touch()
    wait_until(lambda: count_lines(a.log(), "outcome discarded") == 1)
    final = job_row(engine, job_id)
    assert (final["state"], final["result"], final["attempts"]) == ("completed", second["result"], 2)
    # whichever of 'next' and attempt 2 ran last, the cursor holds attempt 2's write
    assert _cursor(engine, "t") == {"pid": a.pid, "attempt": 2}
    late = [e for e in executions(engine) if e.job_id == job_id and e.attempt == 1]
    assert late[0].outcome == "ok"  # it did finish; only its outcome was refused
    assert a.stop() == 0


def test_timed_out_last_attempt_fails_and_frees_its_cursor(
    engine: sa.Engine, model: Any, fleet: WorkerFleet, exec_log: str, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    a = fleet.start("a", ["slow"], threads=2, maintenance_interval=0.2, log_table=EXEC_LOG)
    a.wait_registered(engine)
    job_id = enqueue(engine, model, "slow", "m", {"gate": str(gate)}, cursor_key="t", timeout=0.5)
    waiting = enqueue(engine, model, "slow", "next", {}, cursor_key="t", collapse_on_cursor=False)
    failed = wait_for_state(engine, job_id, "failed", "completed")
    assert failed["state"] == "failed"
    assert failed["result"]["error"]["type"] == "JobTimeout"
    assert wait_for_state(engine, waiting, "completed")["state"] == "completed"
    gate.touch()
    wait_until(lambda: count_lines(a.log(), "outcome discarded") == 1)
    assert job_row(engine, job_id)["state"] == "failed"
    assert a.stop() == 0
