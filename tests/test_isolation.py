"""RunInChildProcess: jobs in child processes, killed at their timeout."""

from __future__ import annotations

import os

import pytest

from psycopg2_mq import JobStates, MQSource, RunInChildProcess

from .isolation_queues import ChildQueue
from .support import enqueue, fetch_job, running_worker, wait_until


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(pid, 0): read its state
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_a_hanging_job_is_killed_at_its_timeout(engine, model, tmp_path):
    pid_file = tmp_path / "pid"
    queue = RunInChildProcess(ChildQueue())
    with running_worker(engine, model, {"iso": queue}, maintenance_interval=30):
        (job_id,) = enqueue(engine, model, ("iso", "hang", {"pid_file": str(pid_file)}), timeout=1.0)
        wait_until(lambda: fetch_job(engine, model, job_id).state == JobStates.FAILED)
    job = fetch_job(engine, model, job_id)
    # failed by the worker itself (the maintenance pass is 30 s away), with the kill as its error
    assert job.result["error"]["type"] == "psycopg2_mq.errors.JobTimeoutError"
    pid = int(pid_file.read_text())
    assert pid != os.getpid()
    wait_until(lambda: not _alive(pid), timeout=10)


def test_results_and_cursor_changes_come_back_from_the_child(engine, model):
    queue = RunInChildProcess(ChildQueue(), timeout=60)
    with running_worker(engine, model, {"iso": queue}):
        ids = enqueue(engine, model, ("iso", "count", {}), ("iso", "count", {}), cursor_key="c",
                      collapse_on_cursor=False)
        wait_until(lambda: all(fetch_job(engine, model, i).state == JobStates.COMPLETED for i in ids))
    results = [fetch_job(engine, model, i).result for i in ids]
    assert [r["n"] for r in results] == [1, 2]
    assert all(r["pid"] != os.getpid() for r in results)
    from sqlalchemy.orm import Session

    with Session(engine) as session:
        assert MQSource(dbsession=session, model=model).get_cursor("c") == {"n": 2}


def test_errors_in_the_child_fail_the_job_with_their_type(engine, model):
    queue = RunInChildProcess(ChildQueue())
    with running_worker(engine, model, {"iso": queue}):
        refused, broken = enqueue(engine, model, ("iso", "refuse", {}), ("iso", "nope", {}))
        wait_until(lambda: fetch_job(engine, model, broken).state == JobStates.FAILED)
        wait_until(lambda: fetch_job(engine, model, refused).state == JobStates.FAILED)
    assert fetch_job(engine, model, refused).result == {"refused": True}
    error = fetch_job(engine, model, broken).result["error"]
    assert error["type"] == "psycopg2_mq.isolation.ChildJobError"
    assert "builtins.KeyError" in error["message"]


def test_the_queue_must_have_execute_job():
    with pytest.raises(TypeError):
        RunInChildProcess(object())
    with pytest.raises(ValueError):
        RunInChildProcess(ChildQueue(), timeout=0)


def test_a_job_without_timeout_has_no_deadline(engine, model):
    """No timeout from the call or the queue: no deadline at all (not a clamped far-future one)."""
    from .support import RecordingQueue

    queue = RecordingQueue(lambda job: job.timeout)
    with running_worker(engine, model, {"q": queue}):
        untimed, timed = enqueue(engine, model, ("q", "m", {}), ("q", "t", {}))
        wait_until(lambda: fetch_job(engine, model, timed).state == JobStates.COMPLETED)
        (limited,) = enqueue(engine, model, ("q", "m", {}), timeout=7.5)
        wait_until(lambda: fetch_job(engine, model, limited).state == JobStates.COMPLETED)
    assert fetch_job(engine, model, untimed).result is None
    assert fetch_job(engine, model, untimed).deadline is None
    assert fetch_job(engine, model, limited).result == pytest.approx(7.5)
