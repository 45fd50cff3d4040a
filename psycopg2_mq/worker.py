"""``MQWorker``: claims jobs of its queues and runs them on a pool of threads.

The thread that calls ``run()`` is the dispatcher. It owns one connection,
which holds the worker's liveness lock, LISTENs to the queues' channels and
claims jobs (one statement for as many as the free threads and the prefetch
buffer take). Between claims it sleeps in ``select()`` until a NOTIFY, a thread
going idle, the next known ``when`` or the next maintenance pass, whichever
comes first. The executor threads and the completer are in ``_executor.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import psycopg2
import psycopg2.errors
import sqlalchemy as sa

from . import _claim, _liveness, _maintenance, _notify
from ._executor import ExecutorPool, connection_failed
from ._queries import Queries
from .model import Model
from .policy import DEFAULT_POLICY, JobPolicy

log = logging.getLogger("psycopg2_mq.worker")

#: how long to back off, at most, between reconnection attempts
MAX_RECONNECT_DELAY = 5.0
#: prefetch enough jobs to keep each thread busy this long (seconds)
PREFETCH_SECONDS = 0.05
#: most jobs prefetched, whatever their speed (the completer writes up to 500 at once)
DEFAULT_PREFETCH = 500


class MQWorker:
    """Run the jobs of ``queues`` (name -> object with ``execute_job(job)``).

    ``threads`` jobs run at once. Every ``maintenance_interval`` seconds the
    worker releases the running jobs of dead workers per their lost policy,
    expires timed-out attempts and prunes (see ``_maintenance.py``). A worker
    counts as dead once its liveness lock has been free for ``lost_after``
    seconds (default: two maintenance intervals), so one that reconnects
    sooner keeps its jobs. ``poll_interval`` is
    only a safety net: wake-ups come from LISTEN/NOTIFY and the known ``when``
    of the next job. With ``capture_signals=True`` and ``run()`` on the main
    thread, SIGTERM and SIGINT shut the worker down gracefully.

    A queue object may have a ``policy`` attribute (a ``JobPolicy``: retries,
    backoff, lost-job policy, timeout) for its jobs. ``prune_after`` maps
    finished states to a retention (seconds or ``timedelta``); older jobs in
    those states are deleted by the maintenance pass. Nothing is pruned unless
    asked.

    Up to ``prefetch`` jobs may be claimed ahead of free threads, so that
    claims come in batches under load: as many as keep the threads busy for
    about 50 ms, judging by how long jobs have been running (none for jobs
    that take longer than that). Prefetched jobs count as running from
    their claim; a cursor's jobs are never claimed two at a time.
    """

    def __init__(
        self,
        *,
        engine: sa.Engine,
        queues: Mapping[str, Any],
        model: Model,
        name: str | None = None,
        threads: int = 1,
        capture_signals: bool = False,
        maintenance_interval: float = 5.0,
        poll_interval: float = 60.0,
        prune_after: Mapping[str, float | timedelta] | None = None,
        prefetch: int | None = None,
        lost_after: float | None = None,
    ) -> None:
        if engine.dialect.driver != "psycopg2":
            raise ValueError(
                f"MQWorker needs a psycopg2 engine (postgresql+psycopg2://...), not {engine.dialect.driver!r}"
            )
        if not queues:
            raise ValueError("a worker needs at least one queue")
        for queue_name, handler in queues.items():
            if not isinstance(queue_name, str) or not queue_name:
                raise ValueError(f"queue names must be non-empty strings, got {queue_name!r}")
            if not callable(getattr(handler, "execute_job", None)):
                raise TypeError(f"queue {queue_name!r} has no execute_job(job) method")
            policy = getattr(handler, "policy", None)
            if policy is not None and not isinstance(policy, JobPolicy):
                raise TypeError(f"queue {queue_name!r}: policy must be a psycopg2_mq.JobPolicy")
        if threads < 1:
            raise ValueError("threads must be at least 1")
        if prefetch is not None and prefetch < 0:
            raise ValueError("prefetch must not be negative")
        if maintenance_interval <= 0 or poll_interval <= 0:
            raise ValueError("intervals must be positive")
        if lost_after is not None and lost_after < 0:
            raise ValueError("lost_after must not be negative")
        self.engine = engine
        self.queues = dict(queues)
        self.model = model
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.threads = threads
        self.prefetch = DEFAULT_PREFETCH if prefetch is None else prefetch
        self.capture_signals = capture_signals
        self.maintenance_interval = maintenance_interval
        self.poll_interval = poll_interval
        self.lost_after = 2 * maintenance_interval if lost_after is None else lost_after
        self.worker_id: int | None = None
        self.retention = _maintenance.normalize_retention(prune_after)
        self._queries = Queries.for_model(model)
        self._queue_names = sorted(self.queues)
        self._policies = json.dumps(
            {name: (getattr(h, "policy", None) or DEFAULT_POLICY).claim_defaults() for name, h in self.queues.items()}
        )
        self._waker = _notify.Waker()
        self._stopping = threading.Event()
        self._state = "created"
        self._conn: Any = None
        self._pool: ExecutorPool | None = None
        self._last_maintenance: float | None = None

    # -- public API -------------------------------------------------------------

    def run(self) -> None:
        """Run until ``shutdown_gracefully()``; blocks."""
        if self._state != "created":
            raise RuntimeError("a worker runs once; create a new one")
        self._state = "running"
        restore = self._install_signal_handlers()
        self._pool = ExecutorPool(
            threads=self.threads,
            connect=self._connect,
            queries=self._queries,
            handlers=self.queues,
            on_idle=self._on_job_done,
            name=self.name,
            handing_over=self._handing_over,
        )
        try:
            self._serve()
        finally:
            self._state = "stopping"
            self._pool.stop()
            self._disconnect(unregister=True)
            self._waker.close()
            restore()
            self._state = "stopped"

    def shutdown_gracefully(self) -> None:
        """Stop claiming; running jobs finish, then ``run()`` returns. Thread-safe."""
        self._stopping.set()
        if self._state in ("created", "running"):
            with contextlib.suppress(OSError):  # already closed: run() is over
                self._waker.wake()

    def get_status(self) -> dict[str, Any]:
        """A snapshot of what this worker is doing."""
        pool = self._pool
        running = pool.running_job_ids() if pool else []
        return {
            "name": self.name,
            "worker_id": self.worker_id,
            "state": "stopping" if self._stopping.is_set() and self._state == "running" else self._state,
            "queues": list(self._queue_names),
            "threads": self.threads,
            "jobs_in_flight": pool.in_flight if pool else 0,
            "running_jobs": running,
            "completed_jobs": pool.counts["completed"] if pool else 0,
            "failed_jobs": pool.counts["failed"] if pool else 0,
            "retried_jobs": pool.counts["retry"] if pool else 0,
            "discarded_outcomes": pool.counts["discarded"] if pool else 0,
            "handed_over_jobs": pool.counts["handed_over"] if pool else 0,
            "last_maintenance_age": None
            if self._last_maintenance is None
            else time.monotonic() - self._last_maintenance,
        }

    # -- the dispatcher ------------------------------------------------------------

    def _serve(self) -> None:
        delay = 0.1
        outage_since: float | None = None
        while not self._stopping.is_set():
            try:
                if self._conn is None:
                    self._open()
                if outage_since is not None:
                    log.warning("worker %s reconnected after %.1fs", self.name, time.monotonic() - outage_since)
                    outage_since = None
                delay = 0.1
                self._dispatch()
            except psycopg2.Error as exc:
                if not connection_failed(self._conn, exc):
                    # a statement failed but the connection, and so our lock, is
                    # fine: keep both rather than let our jobs look abandoned,
                    # and never let bad data end the worker
                    log.error("worker %s: dispatcher statement failed: %s", self.name, exc)
                    self._sleep(delay)
                    delay = min(delay * 2, MAX_RECONNECT_DELAY)
                    continue
                if outage_since is None:
                    outage_since = time.monotonic()
                    log.error("worker %s lost its database connection, reconnecting: %s", self.name, exc)
                self._disconnect(unregister=False)
                self._sleep(delay)
                delay = min(delay * 2, MAX_RECONNECT_DELAY)

    def _dispatch(self) -> None:
        assert self._pool is not None
        next_maintenance = time.monotonic()
        locked_retry = 0.01
        while not self._stopping.is_set():
            now = time.monotonic()
            if now >= next_maintenance:
                assert self.worker_id is not None
                _maintenance.run_maintenance(
                    self._conn,
                    self._queries,
                    self.model.lock_class,
                    self.lost_after,
                    self.retention,
                    self.worker_id,
                    self._pool.owned_while_no_claims,
                )
                self._last_maintenance = now
                next_maintenance = now + self.maintenance_interval
            # refill below the low-water mark, up to the threads plus the
            # prefetch buffer: under load claims come in batches
            in_flight = self._pool.in_flight
            buffer = self._prefetch_now()
            wanted = self.threads + buffer - in_flight if in_flight < self.threads + buffer // 2 else 0
            timeout = min(next_maintenance - now, self.poll_interval)
            if wanted > 0:
                claimed = self._claim(wanted)
                for row in claimed:
                    self._pool.submit(row)
                if len(claimed) == wanted:
                    continue  # got all we asked for: there may be more
                due_in = self._seconds_until_next_job()
                if due_in is not None and due_in <= 0:
                    # due but locked by another claim in flight (or a caller's
                    # transaction): look again shortly, backing off
                    timeout = min(timeout, locked_retry)
                    locked_retry = min(locked_retry * 2, 1.0)
                else:
                    locked_retry = 0.01
                    if due_in is not None:
                        timeout = min(timeout, due_in)
            _notify.wait(self._conn, self._waker, max(timeout, 0.0))

    def _on_job_done(self) -> None:
        """Wake the dispatcher when it has something to do: refill at the low-water mark."""
        pool = self._pool
        if pool is not None and pool.in_flight <= self.threads + self._prefetch_now() // 2:
            self._waker.wake()

    def _handing_over(self) -> dict[str, Any] | None:
        """What the completer needs to claim a finished cursor job's successor (None: don't).

        Not while the dispatcher is disconnected: its liveness lock may be gone,
        and other workers would take jobs claimed meanwhile for a dead worker's.
        """
        conn = self._conn
        if self._stopping.is_set() or self.worker_id is None or conn is None or conn.closed:
            return None
        return {
            "queues": self._queue_names,
            "worker_id": self.worker_id,
            "lock_class": self.model.lock_class,
            "policies": self._policies,
        }

    def _prefetch_now(self) -> int:
        """How many jobs to hold beyond the threads, from how long jobs take."""
        assert self._pool is not None
        mean = self._pool.mean_run_seconds
        if mean is None or self.prefetch == 0:
            return 0
        return min(self.prefetch, int(self.threads * PREFETCH_SECONDS / max(mean, 1e-6)))

    def _claim(self, limit: int) -> list[tuple[Any, ...]]:
        assert self.worker_id is not None
        return _claim.claim_jobs(
            self._conn,
            self._queries,
            lock_class=self.model.lock_class,
            worker_id=self.worker_id,
            queues=self._queue_names,
            limit=limit,
            policies=self._policies,
            prepared=True,
        )

    def _seconds_until_next_job(self) -> float | None:
        return _claim.seconds_until_next_job(self._conn, self._queries, self._queue_names)

    # -- connections -----------------------------------------------------------------

    def _connect(self) -> Any:
        """A psycopg2 connection of our own (taken out of the engine's pool), autocommit."""
        proxied = self.engine.raw_connection()
        conn = proxied.driver_connection
        proxied.detach()
        conn.autocommit = True
        return conn

    def _open(self) -> None:
        conn = self._connect()
        try:
            self.worker_id = _liveness.register_worker(
                conn, self._queries, self.model.lock_class, self.name, self._queue_names, self.worker_id
            )
            _notify.listen(conn, self._queue_names)
            _claim.prepare(conn, self._queries)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        log.info("worker %s (id %s) serving %s", self.name, self.worker_id, ", ".join(self._queue_names))

    def _disconnect(self, unregister: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if unregister and not conn.closed and self.worker_id is not None:
                _liveness.unregister_worker(conn, self._queries, self.model.lock_class, self.worker_id)
        except psycopg2.Error as exc:
            log.warning("worker %s could not unregister: %s", self.name, exc)
        finally:
            conn.close()

    def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once on shutdown."""
        self._stopping.wait(seconds)

    # -- signals ------------------------------------------------------------------------

    def _install_signal_handlers(self) -> Any:
        if not self.capture_signals or threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

        def handle(signum: int, frame: Any) -> None:
            log.info("worker %s: signal %s, shutting down gracefully", self.name, signum)
            self.shutdown_gracefully()

        for sig in previous:
            signal.signal(sig, handle)

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore
