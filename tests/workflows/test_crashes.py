"""SIGKILL the worker running a step or a coordinator; the run still ends correctly.

The queue's lost-job policy is to hold a lost job until someone decides, so
each test plays the operator: ``MQSource.retry_job`` (run it again) or
``MQSource.fail_lost_job`` (give up on it), then lets the run finish.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from psycopg2_mq import JobStates, MQSource
from workflows import RunStates, Step, Workflow

from ..support import fetch_job, running_worker, wait_until
from .steps import StepQueue

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@contextmanager
def hanging_worker(engine: sa.Engine, queue: str) -> Iterator[subprocess.Popen]:
    url = engine.url.render_as_string(hide_password=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.workflows.crash_worker", url, queue],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)


def jobs_of(engine, model, queue: str) -> list:
    with Session(engine) as session:
        return MQSource(dbsession=session, model=model).find_jobs(queue=queue)


def worker_registered(engine, model, name: str) -> bool:
    with Session(engine) as session:
        return (
            session.execute(sa.select(model.Worker.id).where(model.Worker.name == name)).first() is not None
        )


def chain() -> Workflow:
    return Workflow(
        "crash",
        [
            Step("a", "steps", "run", args={"return": "a"}),
            Step("b", "steps", "run", after=("a",)),
            Step("c", "steps", "run", after=("b",)),
        ],
    )


@pytest.mark.parametrize("recovery", ["retry_job", "fail_lost_job"])
def test_worker_killed_while_running_a_step(engine, model, coordinator, wf_session, recovery):
    with wf_session() as wf:
        run_id = wf.start(chain())
    (job,) = jobs_of(engine, model, "steps")
    with hanging_worker(engine, "steps") as proc:
        wait_until(lambda: fetch_job(engine, model, job.id).state == JobStates.RUNNING)
        kill(proc)
    queue = StepQueue()
    with running_worker(engine, model, {"workflows": coordinator}, maintenance_interval=0.2):
        wait_until(lambda: fetch_job(engine, model, job.id).state == JobStates.LOST)
        with wf_session() as wf:
            # a lost job is not terminal: the step is still in flight
            assert wf.get_run(run_id).step("a").state == "running"
        with Session(engine) as session, session.begin():
            mq = MQSource(dbsession=session, model=model)
            if recovery == "retry_job":
                mq.retry_job(job.id)
            else:
                mq.fail_lost_job(job.id)
        with running_worker(engine, model, {"steps": queue}):
            with wf_session() as wf:
                status = wf.wait_for_run(run_id, timeout=30)
                if recovery == "fail_lost_job":
                    assert status.state == RunStates.FAILED
                    assert status.states == {"a": "failed", "b": "skipped", "c": "skipped"}
                    assert status.step("a").error["type"] == "LostJob"
                    wf.retry_step(run_id, "a")
            with wf_session() as wf:
                status = wf.wait_for_run(run_id, timeout=30)
    assert status.state == RunStates.COMPLETED
    assert status.states == {"a": "completed", "b": "completed", "c": "completed"}
    assert status.step("a").attempts == 2
    assert queue.steps_run(run_id) == ["a", "b", "c"]


# retry_job_while_pending: another coordinator of the run is pending when the lost
# one is retried; the retry must queue behind it, not collapse onto it and drop
# the lost advance's finished_jobs (the queue guarantees it since retry_job stopped collapsing)
@pytest.mark.parametrize("recovery", ["retry_job", "fail_lost_job", "retry_job_while_pending"])
def test_worker_killed_while_running_a_coordinator(engine, model, coordinator, wf_session, recovery):
    # "side" finishes while the coordinator is lost: its advance collapses into a
    # pending coordinator that cannot start until the lost one is dealt with
    workflow = chain()
    if recovery != "retry_job":
        workflow = Workflow("crash", [*workflow.steps, Step("side", "steps", "run", args={"sleep": 1.0})])
    queue = StepQueue()
    with (
        hanging_worker(engine, "workflows") as proc,
        running_worker(engine, model, {"steps": queue}, maintenance_interval=0.2),
    ):
        wait_until(lambda: worker_registered(engine, model, "crash-workflows"))
        with wf_session() as wf:
            run_id = wf.start(workflow)

        def coordinator_running():
            return [j for j in jobs_of(engine, model, "workflows") if j.state == JobStates.RUNNING]

        (lost,) = wait_until(coordinator_running)
        kill(proc)
        wait_until(lambda: fetch_job(engine, model, lost.id).state == JobStates.LOST)
        if recovery != "retry_job":
            wait_until(
                lambda: [j for j in jobs_of(engine, model, "workflows") if j.state == JobStates.PENDING]
            )
        with Session(engine) as session, session.begin():
            mq = MQSource(dbsession=session, model=model)
            if recovery.startswith("retry_job"):
                mq.retry_job(lost.id)
            else:
                mq.fail_lost_job(lost.id)
        if recovery == "fail_lost_job":
            # the lost advance was never recorded: have the run re-read once
            with wf_session() as wf:
                wf.reconcile_run(run_id)
        with running_worker(engine, model, {"workflows": coordinator}), wf_session() as wf:
            status = wf.wait_for_run(run_id, timeout=30)
    assert status.state == RunStates.COMPLETED
    assert set(status.states.values()) == {"completed"}
    assert sorted(queue.steps_run(run_id)) == sorted(status.states)
