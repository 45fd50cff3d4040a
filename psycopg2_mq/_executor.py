"""The threads that run claimed jobs and write their outcome.

Each thread has a connection of its own (autocommit) and finishes a job with
one statement (``FINISH_JOB``): state, result, cursor and the wake-up of the
next job on the cursor, together. The outcome is fenced by the claim's attempt
number, so it is written only if the job is still ours.
"""

from __future__ import annotations

import logging
import queue as queue_module
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.errors

from . import _json
from ._queries import Queries
from .errors import FailedJobError, RetryJob
from .job import Job
from .model import JobStates
from .policy import DEFAULT_POLICY

log = logging.getLogger("psycopg2_mq.executor")

#: how long a finished job's outcome is retried through connection failures
FINISH_RETRY_SECONDS = 60.0


#: pseudo-state of an Outcome: the attempt failed and the job goes back to pending
RETRY = "retry"


@dataclass
class Outcome:
    """What to write for a finished attempt.

    ``state`` is completed, failed, or RETRY (then ``result_json`` is the
    attempt's error, kept in ``errors``, and the job runs again after ``delay``).
    """

    state: str
    result_json: str
    cursor_json: str | None
    delay: float = 0.0
    extra_attempts: int = 0


def error_result(exc: BaseException) -> dict[str, Any]:
    """The structured result stored for a job that raised ``exc``."""
    kind = type(exc)
    return {
        "error": {
            "type": f"{kind.__module__}.{kind.__qualname__}",
            "message": _json.scrub(str(exc)),
            "traceback": _json.scrub("".join(traceback.format_exception(exc))),
        }
    }


def run_job(job: Job, handler: Any, max_attempts: int = 1, backoff: dict[str, Any] | None = None) -> Outcome:
    """Run ``handler.execute_job(job)`` and turn whatever happens into an Outcome.

    An exception is retried while attempts are left, after the backoff of the
    call (``backoff``) or of the queue's policy; ``RetryJob`` snoozes the job
    without using up an attempt; ``FailedJobError`` fails it for good.
    """
    save_cursor = False
    try:
        result = handler.execute_job(job)
        state = JobStates.COMPLETED
        save_cursor = True
    except FailedJobError as exc:
        result = exc.result
        state = JobStates.FAILED
        save_cursor = exc.update_cursor
    except RetryJob as exc:
        log.info("job %s (%s.%s) asked to be retried in %.3gs", job.id, job.queue, job.method, exc.delay)
        error = {"type": "RetryJob", "message": _json.scrub(str(exc))}
        return Outcome(RETRY, _json.dumps(error), None, delay=exc.delay, extra_attempts=1)
    except Exception as exc:
        if job.attempt < max_attempts:
            policy = getattr(handler, "policy", None) or DEFAULT_POLICY
            delay = policy.retry_delay(job.attempt, backoff)
            log.warning(
                "job %s (%s.%s) attempt %s/%s failed, retrying in %.3gs: %r",
                job.id, job.queue, job.method, job.attempt, max_attempts, delay, exc,
            )
            return Outcome(RETRY, _json.dumps(error_result(exc)["error"]), None, delay=delay)
        log.exception("job %s (%s.%s) failed", job.id, job.queue, job.method)
        result = error_result(exc)
        state = JobStates.FAILED
    try:
        result_json = _json.dumps(result, "job result")
        cursor_json = _json.dumps(job.cursor, "job cursor") if save_cursor and job.cursor_key is not None else None
    except _json.NotJSONError as exc:
        log.error("job %s (%s.%s): %s", job.id, job.queue, job.method, exc)
        return Outcome(JobStates.FAILED, _json.dumps(error_result(exc)), None)
    return Outcome(state, result_json, cursor_json)


class ExecutorPool:
    """``threads`` threads taking claimed job rows from an in-memory queue."""

    def __init__(
        self,
        *,
        threads: int,
        connect: Callable[[], Any],
        queries: Queries,
        handlers: Mapping[str, Any],
        on_idle: Callable[[], None],
        name: str,
    ) -> None:
        self._connect = connect
        self._queries = queries
        self._handlers = handlers
        self._on_idle = on_idle
        self._inbox: queue_module.SimpleQueue[tuple[Any, ...] | None] = queue_module.SimpleQueue()
        self._lock = threading.Lock()
        self._busy = 0
        self.running: dict[int, Job] = {}
        self.counts = {JobStates.COMPLETED: 0, JobStates.FAILED: 0, RETRY: 0, "discarded": 0}
        self._threads = [
            threading.Thread(target=self._loop, name=f"{name}-exec-{i}", daemon=True) for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def idle(self) -> int:
        with self._lock:
            return len(self._threads) - self._busy

    def submit(self, row: tuple[Any, ...]) -> None:
        with self._lock:
            self._busy += 1
        self._inbox.put(row)

    def stop(self) -> None:
        """Let queued and running jobs finish, then end the threads."""
        for _ in self._threads:
            self._inbox.put(None)
        for thread in self._threads:
            thread.join()

    def _loop(self) -> None:
        conn = None
        while True:
            row = self._inbox.get()
            if row is None:
                break
            try:
                conn = self._execute(row, conn)
            except Exception:
                log.exception("executor failed on job %s", row[0])
            finally:
                with self._lock:
                    self._busy -= 1
                self._on_idle()
        if conn is not None:
            conn.close()

    def _execute(self, row: tuple[Any, ...], conn: Any) -> Any:
        job_id, queue, method, args, cursor_key, trace, attempt, scheduled_time, cursor, max_attempts, backoff = row
        job = Job(
            id=job_id,
            queue=queue,
            method=method,
            args=args,
            cursor=cursor,
            cursor_key=cursor_key,
            trace=trace,
            attempt=attempt,
            scheduled_time=scheduled_time,
        )
        with self._lock:
            self.running[job_id] = job
        try:
            outcome = run_job(job, self._handlers[queue], max_attempts, backoff)
            try:
                return self._finish(job, outcome, conn)
            except psycopg2.DatabaseError as exc:
                # the database refused this outcome (e.g. a trigger failed): record why instead
                log.error("job %s: could not store its outcome: %s", job.id, exc)
                failure = Outcome(JobStates.FAILED, _json.dumps(error_result(exc)), None)
                return self._finish(job, failure, conn)
        finally:
            with self._lock:
                self.running.pop(job_id, None)

    def _finish(self, job: Job, outcome: Outcome, conn: Any) -> Any:
        if outcome.state == RETRY:
            sql = self._queries.retry_job
            params: dict[str, Any] = {
                "id": job.id,
                "attempt": job.attempt,
                "error": outcome.result_json,
                "delay": outcome.delay,
                "extra_attempts": outcome.extra_attempts,
            }
        else:
            sql = self._queries.finish_job
            params = {
                "id": job.id,
                "attempt": job.attempt,
                "state": outcome.state,
                "result": outcome.result_json,
                "cursor": outcome.cursor_json,
            }
        deadline = time.monotonic() + FINISH_RETRY_SECONDS
        delay = 0.05
        while True:
            try:
                if conn is None or conn.closed:
                    conn = self._connect()
                with conn.cursor() as cur:
                    cur.execute(sql, params)
                    row = cur.fetchone()
                break
            except psycopg2.errors.UniqueViolation:
                # a retry raced a new collapsible call onto its cursor; the
                # statement sees it on the next try and stops collapsing
                continue
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                if conn is not None:
                    conn.close()
                conn = None
                if time.monotonic() > deadline:
                    # the job stays running under a worker that may still hold its
                    # lock; give up loudly rather than silently
                    log.error("could not record the outcome of job %s: %s", job.id, exc)
                    return None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        written = bool(row and row[0])
        with self._lock:
            if written:
                self.counts[outcome.state] += 1
            else:
                self.counts["discarded"] += 1
        if not written:
            log.warning(
                "job %s attempt %s: outcome discarded, the job was marked lost or claimed again",
                job.id,
                job.attempt,
            )
        return conn
