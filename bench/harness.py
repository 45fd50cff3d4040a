"""Plumbing shared by every scenario: the server, fresh databases, the execution
tracker, worker processes and statistics.

Nothing here knows about the queue; ``scenarios.py`` (ours) and ``raw.py`` (the
baseline) build on it, so both sides are timed and checked the same way.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg2
import sqlalchemy as sa
from sqlalchemy.engine import make_url

#: every worker process is spawned, never forked: a forked child would inherit
#: the parent's open connections and SQLAlchemy pools
SPAWN = mp.get_context("spawn")


class CheckFailed(Exception):
    """A scenario's honesty check failed: the figure must not be reported."""


# -- server and databases --------------------------------------------------------------


def sqlalchemy_url(url: str) -> sa.URL:
    """``url`` with the psycopg2 driver spelled out, as SQLAlchemy wants it."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg2")
    return u


def dsn(url: sa.URL) -> str:
    """A libpq connection string for raw psycopg2 connections to ``url``."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class Server:
    """The PostgreSQL under test: ``url`` if given, else an embedded ``pgserver``.

    ``fresh_db()`` creates a database per measurement, so no run sees the rows,
    dead tuples or statistics of another; all are dropped on ``close()``.
    """

    def __init__(self, url: str | None) -> None:
        self._datadir: str | None = None
        self._pg: Any = None
        if url:
            self.embedded = False
            self.url = sqlalchemy_url(url)
        else:
            import pgserver  # optional dependency: pip install -e '.[embedded]'

            self.embedded = True
            self._datadir = tempfile.mkdtemp(prefix="mq-bench-pg-")
            self._pg = pgserver.get_server(self._datadir, cleanup_mode="stop")
            self.url = sqlalchemy_url(self._pg.get_uri())
        self.admin_url = self.url.set(database="postgres")
        self._created: list[str] = []

    def fresh_db(self, prefix: str) -> sa.URL:
        name = f"bench_{prefix}_{uuid.uuid4().hex[:8]}"
        with contextlib.closing(psycopg2.connect(dsn(self.admin_url))) as conn:
            conn.autocommit = True
            conn.cursor().execute(f'CREATE DATABASE "{name}"')
        self._created.append(name)
        return self.url.set(database=name)

    def drop_db(self, url: sa.URL) -> None:
        name = url.database
        with contextlib.closing(psycopg2.connect(dsn(self.admin_url))) as conn:
            conn.autocommit = True
            # WITH (FORCE): a worker that failed to stop must not keep the database alive
            conn.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self._created:
            self._created.remove(name)

    def settings(self) -> dict[str, str]:
        names = [
            "server_version",
            "fsync",
            "synchronous_commit",
            "shared_buffers",
            "max_connections",
            "wal_level",
            "work_mem",
        ]
        with contextlib.closing(psycopg2.connect(dsn(self.admin_url))) as conn, conn.cursor() as cur:
            out = {}
            for name in names:
                cur.execute(f"SHOW {name}")
                out[name] = cur.fetchone()[0]
            return out

    def close(self) -> None:
        for name in list(self._created):
            with contextlib.suppress(psycopg2.Error):
                self.drop_db(self.url.set(database=name))
        if self._pg is not None:
            self._pg.cleanup()
        if self._datadir:
            shutil.rmtree(self._datadir, ignore_errors=True)


def url_str(url: sa.URL) -> str:
    """The URL as a string a child process can connect with (``str()`` masks the password)."""
    return url.render_as_string(hide_password=False)


def sql(url: sa.URL, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement in autocommit mode and return its rows (if any)."""
    with contextlib.closing(psycopg2.connect(dsn(url))) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []


def vacuum_analyze(url: sa.URL) -> None:
    sql(url, "VACUUM ANALYZE")


# -- execution tracker --------------------------------------------------------------------


class Tracker:
    """What ran, how often and when: a file-backed mmap shared by all processes.

    Per job slot ``i``: a run count (one byte, saturating) and the
    ``time.monotonic()`` of the start and the end of its last run. On Linux the
    monotonic clock is system-wide, so times taken in different processes are
    comparable. A hit costs two stores into shared memory: the measurement
    stays far below a database round trip.
    """

    def __init__(self, path: str, n: int) -> None:
        self.path = path
        self.n = n
        self._starts_at = (n + 7) // 8 * 8
        self._size = self._starts_at + 16 * n
        self._fd = os.open(path, os.O_RDWR)
        self._mm = mmap.mmap(self._fd, self._size)
        view = memoryview(self._mm)
        self._counts = view[:n]
        self._starts = view[self._starts_at : self._starts_at + 8 * n].cast("d")
        self._ends = view[self._starts_at + 8 * n : self._size].cast("d")

    @classmethod
    def create(cls, n: int) -> Tracker:
        fd, path = tempfile.mkstemp(
            prefix="mq-bench-track-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
        )
        os.ftruncate(fd, (n + 7) // 8 * 8 + 16 * n)
        os.close(fd)
        return cls(path, n)

    def begin(self, i: int) -> None:
        count = self._counts[i]
        self._counts[i] = count + 1 if count < 255 else 255
        self._starts[i] = time.monotonic()

    def end(self, i: int) -> None:
        self._ends[i] = time.monotonic()

    def ran(self, i: int) -> bool:
        return self._counts[i] > 0

    def done(self) -> int:
        """How many slots ran at least once."""
        return self.n - bytes(self._counts).count(0)

    def check_exactly_once(self) -> None:
        raw = bytes(self._counts)
        missing, once = raw.count(0), raw.count(1)
        dupes = self.n - missing - once
        if missing or dupes:
            raise CheckFailed(f"{missing} job(s) never ran, {dupes} ran more than once (of {self.n})")

    def start(self, i: int) -> float:
        return self._starts[i]

    def finish(self, i: int) -> float:
        return self._ends[i]

    def last_end(self) -> float:
        return max(self._ends)

    def wait_done(self, count: int, timeout: float, alive: Callable[[], bool] | None = None) -> None:
        """Block until ``count`` slots ran; fail on timeout or a dead worker."""
        deadline = time.monotonic() + timeout
        while self.done() < count:
            if time.monotonic() > deadline:
                raise CheckFailed(f"timeout: {self.done()} of {count} jobs ran within {timeout:.0f}s")
            if alive is not None and not alive():
                raise CheckFailed(f"a worker process died after {self.done()} of {count} jobs")
            time.sleep(0.005)

    def wait_one(self, i: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._counts[i]:
            if time.monotonic() > deadline:
                raise CheckFailed(f"job {i} did not start within {timeout:.0f}s")
            time.sleep(0.0001)

    def close(self, unlink: bool = True) -> None:
        self._counts.release()
        self._starts.release()
        self._ends.release()
        self._mm.close()
        os.close(self._fd)
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


# -- worker processes ------------------------------------------------------------------------


@dataclass
class Spec:
    """What a worker process needs; picklable, so it crosses the spawn boundary."""

    url: str
    tracker_path: str
    n_slots: int
    threads: int = 1
    options: dict[str, Any] = field(default_factory=dict)


def _process_entry(target: Callable[..., Any], spec: Spec, ready: Any, go: Any, stop: Any, out: Any) -> None:
    # errors travel back through ``out`` so that the parent can print FAIL with the reason
    tracker = Tracker(spec.tracker_path, spec.n_slots)
    try:
        result = target(spec, tracker, ready, go, stop)
        out.put(("ok", result))
    except BaseException as exc:  # report, do not hide: the parent prints FAIL
        out.put(("error", f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        tracker.close(unlink=False)


class Workers:
    """Worker processes started together and released at one instant (``go``).

    Each ``target(spec, tracker, ready, go, stop)`` imports and connects what it
    needs, sets ``ready``, waits for ``go`` and runs until ``stop``; its return
    value comes back through ``results()``.
    """

    def __init__(self, target: Callable[..., Any], specs: Sequence[Spec]) -> None:
        self._go = SPAWN.Event()
        self._stop = SPAWN.Event()
        self._out = SPAWN.Queue()
        self._ready = [SPAWN.Event() for _ in specs]
        self._procs = [
            SPAWN.Process(
                target=_process_entry,
                args=(target, spec, ready, self._go, self._stop, self._out),
                daemon=True,
            )
            for spec, ready in zip(specs, self._ready, strict=True)
        ]
        self.t0 = 0.0

    def start(self, timeout: float = 120.0) -> None:
        for proc in self._procs:
            proc.start()
        deadline = time.monotonic() + timeout
        for ready, proc in zip(self._ready, self._procs, strict=True):
            while not ready.wait(0.1):
                if not proc.is_alive() or time.monotonic() > deadline:
                    self.stop(timeout=5)
                    raise CheckFailed(f"worker process did not get ready: {self._errors()}")

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs if proc.pid is not None]

    def go(self) -> float:
        self.t0 = time.monotonic()
        self._go.set()
        return self.t0

    def alive(self) -> bool:
        return all(proc.is_alive() for proc in self._procs)

    def stop(self, timeout: float = 60.0) -> list[Any]:
        """Ask for a graceful stop; kill what does not stop; return the results."""
        self._stop.set()
        self._go.set()
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            proc.join(max(deadline - time.monotonic(), 0.1))
        killed = [proc for proc in self._procs if proc.is_alive()]
        for proc in killed:
            proc.kill()
            proc.join()
        results = self._drain_out()
        errors = [r for kind, r in results if kind == "error"]
        if errors or killed:
            raise CheckFailed(f"worker process failed: {errors or 'did not stop in time'}")
        return [r for _, r in results]

    def _drain_out(self) -> list[tuple[str, Any]]:
        results = []
        with contextlib.suppress(Exception):
            while True:
                results.append(self._out.get(timeout=0.2))
        return results

    def _errors(self) -> str:
        return "; ".join(str(r) for _, r in self._drain_out()) or "no error reported"


@contextlib.contextmanager
def tracked(n: int) -> Iterator[Tracker]:
    tracker = Tracker.create(n)
    try:
        yield tracker
    finally:
        tracker.close()


# -- statistics and environment -----------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100), linear between closest ranks."""
    data = sorted(values)
    if not data:
        raise ValueError("no values")
    k = (len(data) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 in milliseconds."""
    ms = [s * 1000.0 for s in seconds]
    return {"p50": percentile(ms, 50), "p95": percentile(ms, 95), "p99": percentile(ms, 99)}


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def rss_kib() -> int:
    """This process's resident memory in KiB, without shared memory.

    VmRSS minus RssShmem: the execution tracker is a shared mapping that the
    job touches once per job, so VmRSS would grow by ~17 bytes per job slot
    through the measurement itself, not through the worker.
    """
    fields: dict[str, int] = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssShmem"):
                fields[key] = int(rest.split()[0])
    if "VmRSS" not in fields:
        raise RuntimeError("no VmRSS in /proc/self/status")
    return fields["VmRSS"] - fields.get("RssShmem", 0)


def git_state(repo: str) -> str:
    """Commit and local changes of the library, recorded with every run."""

    def run(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", repo, *args], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    if not os.path.isdir(os.path.join(repo, ".git")):
        # an exported snapshot (git archive) carries its commit in a COMMIT file
        marker = os.path.join(repo, "COMMIT")
        if os.path.exists(marker):
            with open(marker) as f:
                return f"{f.read().strip()} (exported snapshot at {repo})"
        return f"? (not a git checkout: {repo})"
    head = run("rev-parse", "--short", "HEAD") or "?"
    dirty = run("status", "--short", "psycopg2_mq")
    return head + (
        " + uncommitted psycopg2_mq changes: " + dirty.replace("\n", ", ")
        if dirty
        else " (psycopg2_mq clean)"
    )


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.uname().sysname} {os.uname().release}, {os.cpu_count()} CPUs ({cpu}), {mem_gib:.0f} GiB RAM"
