"""Helpers shared by the tests: workers in threads, waiting on the database."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from psycopg2_mq import MQSource, MQWorker

#: generous bound for anything that should happen "within seconds"; never a speed claim
PATIENCE = 30.0


def wait_until(predicate: Callable[[], Any], timeout: float = PATIENCE, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


@contextmanager
def running_worker(engine: sa.Engine, model: Any, queues: dict[str, Any], **kwargs: Any) -> Iterator[MQWorker]:
    """Run an ``MQWorker`` in a thread for the duration of the block, then stop it gracefully."""
    worker = MQWorker(engine=engine, model=model, queues=queues, **kwargs)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            worker.run()
        except BaseException as exc:  # surfaced when the block ends
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"worker-{worker.name}", daemon=True)
    thread.start()
    wait_until(lambda: worker.get_status()["worker_id"] is not None or errors)
    try:
        yield worker
    finally:
        worker.shutdown_gracefully()
        thread.join(PATIENCE)
        assert not thread.is_alive(), "worker did not stop"
        if errors:
            raise errors[0]


def enqueue(engine: sa.Engine, model: Any, *calls: tuple[Any, ...], **kwargs: Any) -> list[int]:
    """Queue ``(queue, method, args)`` calls in one committed transaction; returns job ids."""
    with Session(engine) as session, session.begin():
        source = MQSource(dbsession=session, model=model)
        return [source.call(*call, **kwargs).id for call in calls]


def job_states(engine: sa.Engine, model: Any) -> dict[int, str]:
    with Session(engine) as session:
        return {row[0]: row[1] for row in session.execute(sa.select(model.Job.id, model.Job.state))}


def fetch_job(engine: sa.Engine, model: Any, job_id: int) -> Any:
    with Session(engine, expire_on_commit=False) as session:
        job = session.get(model.Job, job_id)
        session.expunge_all()
        return job


class RecordingQueue:
    """A queue that records every execution (thread-safe) and runs ``behaviour``."""

    def __init__(self, behaviour: Callable[[Any], Any] | None = None) -> None:
        self.behaviour = behaviour
        self.lock = threading.Lock()
        self.executions: list[dict[str, Any]] = []

    def execute_job(self, job: Any) -> Any:
        record = {"id": job.id, "method": job.method, "cursor_key": job.cursor_key, "start": time.monotonic()}
        try:
            return self.behaviour(job) if self.behaviour else {"echo": job.args}
        finally:
            record["end"] = time.monotonic()
            with self.lock:
                self.executions.append(record)

    def ids(self) -> list[int]:
        with self.lock:
            return [r["id"] for r in self.executions]
