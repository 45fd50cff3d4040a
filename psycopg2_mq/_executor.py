"""The threads that run claimed jobs, and the one that writes their outcomes.

``threads`` executor threads take claimed jobs from an in-memory queue and run
them. Each outcome goes to a single completer thread, which writes every
outcome waiting at that moment in one statement (``FINISH_JOBS``; a lone one
with ``FINISH_JOB``): state, result, cursor and the wake-up of the next job on
each cursor, in one transaction. Under load outcomes share a commit; when idle,
an outcome is written the moment it arrives. Every write is fenced by the
claim's attempt number, so it lands only if the job is still ours.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue as queue_module
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.errors

from . import _json
from ._claim import CURSOR
from ._queries import Queries
from .errors import FailedJobError, RetryJob
from .job import Job
from .model import JobStates
from .policy import DEFAULT_POLICY

log = logging.getLogger("psycopg2_mq.executor")

#: how long outcomes are retried through connection failures before giving up
FINISH_RETRY_SECONDS = 60.0
#: most outcomes written by one statement
MAX_BATCH = 500
#: longest retry delay written (about 10 years); PostgreSQL intervals overflow far later
MAX_DELAY_SECONDS = 3.2e8

#: errors by which the database refuses an outcome, as opposed to connection failures
_REFUSED = (psycopg2.DataError, psycopg2.IntegrityError, psycopg2.InternalError, psycopg2.ProgrammingError,
            psycopg2.NotSupportedError)

#: pseudo-state of an Outcome: the attempt failed and the job goes back to pending
RETRY = "retry"

#: columns in a claimed row (CLAIM_JOBS' RETURNING)
CLAIMED_COLUMNS = 12


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


def connection_failed(conn: Any, exc: psycopg2.Error) -> bool:
    """Whether ``exc`` means ``conn`` is gone (rather than a statement refused).

    A connection that died mid-statement may raise a bare ``DatabaseError``
    without an SQLSTATE ("server closed the connection unexpectedly", seen when
    PostgreSQL crashed) and leave ``closed`` at 0.
    """
    if conn is None or conn.closed:
        return True
    return type(exc) is psycopg2.DatabaseError and exc.pgcode is None


def _worth_a_new_connection(conn: Any, exc: psycopg2.Error) -> bool:
    """For the completer: the connection is gone, or the error is operational (a
    cancel, a timeout) and a fresh connection may succeed; not a refusal."""
    return connection_failed(conn, exc) or isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError))


def error_result(exc: BaseException) -> dict[str, Any]:
    """The structured result stored for a job that raised ``exc``."""
    kind = type(exc)
    try:
        message = str(exc)
    except Exception:  # an exception may fail even to print itself
        message = f"<unprintable {kind.__qualname__}>"
    try:
        trace = "".join(traceback.format_exception(exc))
    except Exception:
        trace = message
    return {
        "error": {
            "type": f"{kind.__module__}.{kind.__qualname__}",
            "message": _json.scrub(message),
            "traceback": _json.scrub(trace),
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
    except BaseException as exc:  # SystemExit too: a job must not end its thread
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


def job_from_row(row: tuple[Any, ...]) -> tuple[Job, int, dict[str, Any] | None]:
    """A claimed row (``CLAIM_JOBS``' RETURNING) -> (Job, max_attempts, backoff)."""
    (job_id, queue, method, args, cursor_key, trace, attempt, scheduled_time, cursor, max_attempts, backoff,
     timeout) = row
    job = Job(
        timeout=timeout,
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
    return job, max_attempts, backoff


class ExecutorPool:
    """``threads`` threads running claimed jobs, and the completer writing outcomes."""

    def __init__(
        self,
        *,
        threads: int,
        connect: Callable[[], Any],
        queries: Queries,
        handlers: Mapping[str, Any],
        on_idle: Callable[[], None],
        name: str,
        handing_over: Callable[[], dict[str, Any] | None] | None = None,
    ) -> None:
        """``handing_over()``: the parameters with which the completer may claim the
        next job of a finished job's cursor (``FINISH_JOB_HANDING_OVER``:
        queues, worker_id, lock_class, policies), or None for not now."""
        self._connect = connect
        self._queries = queries
        self._handlers = handlers
        self._on_idle = on_idle
        self._inbox: queue_module.SimpleQueue[tuple[Any, ...] | None] = queue_module.SimpleQueue()
        self._outbox: queue_module.SimpleQueue[tuple[Job, Outcome] | None] = queue_module.SimpleQueue()
        self._lock = threading.Lock()
        self._in_flight = 0
        #: jobs claimed for this pool whose outcome is not written yet
        self._owned: set[int] = set()
        #: moving average of how long a job runs, for sizing the prefetch
        self.mean_run_seconds: float | None = None
        self.running: dict[int, Job] = {}
        self.counts = {JobStates.COMPLETED: 0, JobStates.FAILED: 0, RETRY: 0, "discarded": 0, "handed_over": 0}
        self._handing_over = handing_over
        #: held while the completer claims (a hand-over) and while maintenance
        #: looks for orphans, so that it never sees a claim of ours half-taken
        self._claim_lock = threading.Lock()
        self._accepting = True
        #: the completer's connection on which the hand-over is prepared
        self._prepared_on: Any = None
        self._threads = [
            threading.Thread(target=self._run_loop, name=f"{name}-exec-{i}", daemon=True) for i in range(threads)
        ]
        self._completer = threading.Thread(target=self._complete_loop, name=f"{name}-completer", daemon=True)
        for thread in (*self._threads, self._completer):
            thread.start()

    @property
    def in_flight(self) -> int:
        """Jobs handed to the pool whose run has not ended yet (queued or running)."""
        with self._lock:
            return self._in_flight

    def owned_job_ids(self) -> list[int]:
        """Jobs handed to the pool whose outcome is not written (nor given up) yet."""
        with self._lock:
            return sorted(self._owned)

    @contextlib.contextmanager
    def owned_while_no_claims(self) -> Iterator[list[int]]:
        """``owned_job_ids()``, with no hand-over claim in flight until the block ends.

        Maintenance releases this worker's running jobs that it does not own;
        a job that the completer's hand-over has claimed but not yet taken in
        must not look like one.
        """
        with self._claim_lock:
            yield self.owned_job_ids()

    def running_job_ids(self) -> list[int]:
        with self._lock:
            return sorted(self.running)

    def submit(self, row: tuple[Any, ...]) -> None:
        with self._lock:
            self._in_flight += 1
            self._owned.add(row[0])
        self._inbox.put(row)

    def stop(self) -> None:
        """Run every job handed over, write every outcome, then end the threads."""
        with self._claim_lock:
            # a hand-over after the threads' sentinels would never run
            self._accepting = False
        for _ in self._threads:
            self._inbox.put(None)
        for thread in self._threads:
            thread.join()
        self._outbox.put(None)
        self._completer.join()

    # -- executor threads --------------------------------------------------------

    def _run_loop(self) -> None:
        while True:
            row = self._inbox.get()
            if row is None:
                break
            done: tuple[Job, Outcome] | None = None
            try:
                job, max_attempts, backoff = job_from_row(row)
                with self._lock:
                    self.running[job.id] = job
                started = time.monotonic()
                try:
                    outcome = run_job(job, self._handlers[job.queue], max_attempts, backoff)
                except BaseException as exc:
                    # run_job catches the job's errors; this is our own bug, and
                    # the job must still get an outcome rather than stay running
                    log.exception("executor failed on job %s", job.id)
                    outcome = Outcome(JobStates.FAILED, _json.dumps(error_result(exc)), None)
                finally:
                    took = time.monotonic() - started
                    with self._lock:
                        self.running.pop(job.id, None)
                        mean = self.mean_run_seconds
                        self.mean_run_seconds = took if mean is None else 0.9 * mean + 0.1 * took
                done = (job, outcome)
            except Exception:
                log.exception("executor failed on job %s", row[0])
                with self._lock:
                    self._owned.discard(row[0])
            finally:
                # the run is over before its outcome goes out: the completer
                # then sees this thread free and may hand it the cursor's next job
                with self._lock:
                    self._in_flight -= 1
                if done is not None:
                    self._outbox.put(done)
                self._on_idle()

    # -- the completer ------------------------------------------------------------

    def _complete_loop(self) -> None:
        conn = None
        stopping = False
        while not stopping:
            first = self._outbox.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    item = self._outbox.get_nowait()
                except queue_module.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            try:
                conn = self._write(batch, conn)
            except Exception:
                # given up: the worker's next maintenance pass releases these
                # jobs per their lost policy, as it no longer holds them
                log.exception("could not record the outcomes of jobs %s", [job.id for job, _ in batch])
            finally:
                with self._lock:
                    self._owned.difference_update(job.id for job, _ in batch)
        if conn is not None:
            conn.close()

    def _write(self, batch: list[tuple[Job, Outcome]], conn: Any) -> Any:
        finishes = [(job, outcome) for job, outcome in batch if outcome.state != RETRY]
        retries = [(job, outcome) for job, outcome in batch if outcome.state == RETRY]
        if len(finishes) == 1:
            conn = self._finish_one(*finishes[0], conn)
        elif finishes:
            conn = self._finish_many(finishes, conn)
        for job, outcome in retries:
            conn = self._retry(job, outcome, conn)
        return conn

    def _finish_one(self, job: Job, outcome: Outcome, conn: Any) -> Any:
        params = {
            "id": job.id,
            "attempt": job.attempt,
            "state": outcome.state,
            "result": outcome.result_json,
            "cursor": outcome.cursor_json,
        }
        if job.cursor_key is not None:
            try:
                written, conn = self._finish_handing_over(params, conn)
            except _REFUSED as exc:
                return self._refused(job, exc, conn)
            if written is not None:
                self._count([job.id] if written else [], [(job, outcome)])
                return conn
        try:
            row, conn = self._execute(self._queries.finish_job, params, conn)
        except _REFUSED as exc:
            return self._refused(job, exc, conn)
        self._count([job.id] if row and row[0] else [], [(job, outcome)])
        return conn

    def _finish_handing_over(self, params: dict[str, Any], conn: Any) -> tuple[bool | None, Any]:
        """Finish a cursor's job and claim the cursor's next job, if it is ours to run.

        Only when a thread is free to start it at once. Returns (written, conn),
        or (None, conn) when it did not run the statement, or lost its
        connection doing so: the plain FINISH_JOB then writes the outcome
        (fenced, so a hand-over that did commit costs a discarded outcome, and
        its claimed job is released by maintenance like any lost claim reply).
        """
        extra = self._handing_over() if self._handing_over is not None else None
        if extra is None or self.in_flight >= len(self._threads):
            return None, conn
        with self._claim_lock:
            if not self._accepting:
                return None, conn
            statement = self._queries.finish_job_handing_over_prepared
            try:
                if conn is None or conn.closed:
                    conn = self._connect()
                with conn.cursor() as cur:
                    if conn is not self._prepared_on:
                        cur.execute(statement.prepare)
                        cur.execute("SET plan_cache_mode = force_generic_plan")
                        self._prepared_on = conn
                    cur.execute(statement.execute, {**params, **extra})
                    row = cur.fetchone()
            except psycopg2.Error as exc:
                if _worth_a_new_connection(conn, exc):
                    if conn is not None:
                        conn.close()
                    return None, None
                raise
            claimed = row[3 : 3 + CLAIMED_COLUMNS]
            if claimed[0] is not None:
                # the cursor column: the data this statement saved, else the stored one
                self.submit((*claimed[:CURSOR], row[-1], *claimed[CURSOR + 1 :]))
                with self._lock:
                    self.counts["handed_over"] += 1
        return bool(row[0]), conn

    def _finish_many(self, batch: list[tuple[Job, Outcome]], conn: Any) -> Any:
        items = []
        for job, outcome in batch:
            item = f'{{"id":{job.id},"attempt":{job.attempt},"state":"{outcome.state}","result":{outcome.result_json}'
            if outcome.cursor_json is not None:
                item += f',"cursor":{outcome.cursor_json}'
            items.append(item + "}")
        try:
            row, conn = self._execute(self._queries.finish_jobs, {"outcomes": "[" + ",".join(items) + "]"}, conn)
        except _REFUSED as exc:
            # the batch was refused as a whole: write each alone, so that one
            # bad outcome cannot hold back the others
            log.warning("a batch of %d outcomes was refused (%s); writing them one by one", len(batch), exc)
            for job, outcome in batch:
                conn = self._finish_one(job, outcome, conn)
            return conn
        self._count(list(row[0]) if row else [], batch)
        return conn

    def _retry(self, job: Job, outcome: Outcome, conn: Any) -> Any:
        params = {
            "id": job.id,
            "attempt": job.attempt,
            "error": outcome.result_json,
            # a custom backoff may return anything: keep it a storable interval
            "delay": min(max(outcome.delay, 0.0), MAX_DELAY_SECONDS) if math.isfinite(outcome.delay) else 0.0,
            "extra_attempts": outcome.extra_attempts,
        }
        for _ in range(3):
            try:
                row, conn = self._execute(self._queries.retry_job, params, conn)
                break
            except psycopg2.errors.UniqueViolation:
                # a new collapsible call raced onto its cursor; the next try
                # sees it and stops collapsing this job
                continue
            except _REFUSED as exc:
                return self._refused(job, exc, conn)
        else:
            row = None
        self._count([job.id] if row and row[0] else [], [(job, outcome)])
        return conn

    def _refused(self, job: Job, exc: Exception, conn: Any) -> Any:
        """The database refused an outcome (e.g. a trigger failed): fail the job with why."""
        log.error("job %s: could not store its outcome: %s", job.id, exc)
        failure = Outcome(JobStates.FAILED, _json.dumps(error_result(exc)), None)
        params = {"id": job.id, "attempt": job.attempt, "state": failure.state, "result": failure.result_json,
                  "cursor": None}
        row, conn = self._execute(self._queries.finish_job, params, conn)
        self._count([job.id] if row and row[0] else [], [(job, failure)])
        return conn

    def _execute(self, sql: str, params: dict[str, Any], conn: Any) -> tuple[Any, Any]:
        """Run one autocommit statement, reconnecting through connection failures."""
        deadline = time.monotonic() + FINISH_RETRY_SECONDS
        delay = 0.05
        while True:
            try:
                if conn is None or conn.closed:
                    conn = self._connect()
                with conn.cursor() as cur:
                    cur.execute(sql, params)
                    return cur.fetchone(), conn
            except psycopg2.Error as exc:
                if not _worth_a_new_connection(conn, exc):
                    raise
                if conn is not None:
                    conn.close()
                conn = None
                if time.monotonic() > deadline:
                    # the jobs stay running; once this worker's lock goes, the
                    # maintenance of any worker applies their lost policy
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _count(self, written_ids: list[int], batch: list[tuple[Job, Outcome]]) -> None:
        written = set(written_ids)
        with self._lock:
            for job, outcome in batch:
                if job.id in written:
                    self.counts[outcome.state] += 1
                else:
                    self.counts["discarded"] += 1
                    log.warning(
                        "job %s attempt %s: outcome discarded, the job was marked lost or claimed again",
                        job.id,
                        job.attempt,
                    )
