"""Shared by the fault tests and ``bench/reliability_bench.py``: worker processes, faults, checks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from .. import support

REPO_ROOT = Path(__file__).resolve().parents[2]
EXEC_LOG = "faults_exec_log"
#: generous bound for what must happen "within seconds"; never a speed claim
PATIENCE = 60.0


def wait_until(predicate: Callable[[], Any], timeout: float = PATIENCE, interval: float = 0.02) -> Any:
    """``tests.support.wait_until`` with this suite's longer patience (processes, restarts)."""
    return support.wait_until(predicate, timeout, interval)


def poll_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Like wait_until, but return the last (falsy) value instead of failing."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def url_string(url: sa.URL | str) -> str:
    return url.render_as_string(hide_password=False) if isinstance(url, sa.URL) else url


def create_exec_log(engine: sa.Engine, table: str = EXEC_LOG) -> str:
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
        conn.exec_driver_sql(
            f"CREATE TABLE {table} (id bigserial PRIMARY KEY, job_id bigint NOT NULL, attempt int NOT NULL, "
            "cursor_key text, pid int NOT NULL, started timestamptz NOT NULL, ended timestamptz, outcome text)"
        )
    return table


# -- worker processes ----------------------------------------------------------------------------------------


@dataclass
class WorkerProc:
    """A worker running ``tests/faults/worker_main.py`` in a process of its own."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    out_path: Path
    stopped: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def worker_id(self, engine: sa.Engine) -> int | None:
        with engine.connect() as conn:
            return conn.exec_driver_sql(
                "SELECT max(id) FROM mq_worker WHERE pid = %(pid)s AND name = %(name)s",
                {"pid": self.pid, "name": self.name},
            ).scalar()

    def wait_registered(self, engine: sa.Engine, timeout: float = PATIENCE) -> int:
        def registered() -> int | None:
            assert self.alive(), f"worker {self.name} died:\n{self.log()[-3000:]}"
            return self.worker_id(engine)

        return int(wait_until(registered, timeout=timeout, interval=0.05))

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, like an OOM kill or a power cut of the process."""
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(PATIENCE)

    def pause(self) -> None:
        self.popen.send_signal(signal.SIGSTOP)
        self.stopped = True

    def resume(self) -> None:
        self.popen.send_signal(signal.SIGCONT)
        self.stopped = False

    def stop(self, timeout: float = PATIENCE) -> int:
        """SIGTERM: the worker shuts down gracefully; returns the exit code."""
        if self.stopped:
            self.resume()
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout)


@dataclass
class WorkerFleet:
    """Starts worker processes and makes sure none outlives the test."""

    url: str
    tmpdir: Path
    started: list[WorkerProc] = field(default_factory=list)

    def start(self, name: str, queues: list[str], **options: Any) -> WorkerProc:
        config = {"url": self.url, "name": name, "queues": queues, **options}
        log_path = self.tmpdir / f"{name}.log"
        out_path = self.tmpdir / f"{name}.out"
        with open(log_path, "wb") as err, open(out_path, "wb") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "tests.faults.worker_main", json.dumps(config)],
                cwd=REPO_ROOT,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        proc = WorkerProc(name, popen, log_path, out_path)
        self.started.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.started:
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.send_signal(signal.SIGCONT)
                    proc.popen.send_signal(signal.SIGKILL)
        for proc in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(PATIENCE)


@contextlib.contextmanager
def worker_fleet(url: sa.URL | str, tmpdir: Path | None = None) -> Iterator[WorkerFleet]:
    with contextlib.ExitStack() as stack:
        if tmpdir is None:
            tmpdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mq-fleet-")))
        fleet = WorkerFleet(url_string(url), tmpdir)
        try:
            yield fleet
        finally:
            fleet.close()


# -- faults ---------------------------------------------------------------------------------------------------


def dispatcher_backend(engine: sa.Engine, lock_class: int, worker_id: int) -> int | None:
    """The backend pid holding a worker's liveness lock: its dispatcher connection."""
    with engine.connect() as conn:
        return conn.exec_driver_sql(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 "
            "AND classid = %(c)s::bigint::oid AND objid = %(w)s::bigint::oid "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            {"c": lock_class, "w": worker_id},
        ).scalar()


def worker_backends(engine: sa.Engine, name: str) -> list[int]:
    """Backend pids of a worker's own connections (dispatcher and completer)."""
    with engine.connect() as conn:
        return list(
            conn.exec_driver_sql(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %(a)s", {"a": f"mq-worker:{name}"}
            ).scalars()
        )


def terminate(engine: sa.Engine, pids: list[int]) -> int:
    with engine.connect() as conn:
        return sum(
            bool(conn.exec_driver_sql("SELECT pg_terminate_backend(%(p)s)", {"p": pid}).scalar())
            for pid in pids
        )


def terminate_all_backends(engine: sa.Engine) -> int:
    """Terminate every other connection to this database (only ours: never other databases)."""
    with engine.connect() as conn:
        return int(
            conn.exec_driver_sql(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            ).scalar_one()
        )


def db_now(engine: sa.Engine) -> Any:
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT clock_timestamp()").scalar_one()


class PrivateServer:
    """A PostgreSQL of the test's own (pgserver), which it may stop and restart at will.

    ``pg_ctl`` ships inside the pgserver package; as root, pgserver runs the
    server as its own OS user, so pg_ctl runs as that user too.
    """

    def __init__(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver

        # a short path: it holds the Unix socket, whose path is limited to ~100 bytes
        self.datadir = Path(tempfile.mkdtemp(prefix="mqf-pg-"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._server = pgserver.get_server(self.datadir, cleanup_mode="stop")
        self.url = sa.make_url(self._server.get_uri()).set(
            drivername="postgresql+psycopg2", database="postgres"
        )
        self._socket_dir = self._server.get_postmaster_info().socket_dir
        #: an engine on the test database of this server, set by the fixture
        self.engine: sa.Engine | None = None

    def _pg_ctl(self, args: list[str]) -> None:
        from pgserver._commands import pg_ctl

        pg_ctl(args, pgdata=self._server.pgdata, user=self._server.system_user, timeout=120)

    def restart(self) -> None:
        """``pg_ctl -m fast restart``: every session is ended, every advisory lock released."""
        self._pg_ctl(["-w", "-m", "fast", "restart"])

    def crash(self) -> None:
        """``pg_ctl -m immediate restart``: no shutdown checkpoint, so the WAL not yet
        flushed is lost and the server starts with crash recovery."""
        self._pg_ctl(["-w", "-m", "immediate", "restart"])

    def stop(self) -> None:
        self._pg_ctl(["-w", "-m", "fast", "stop"])

    def start(self) -> None:
        self._pg_ctl(
            [
                "-w",
                "-o",
                '-h ""',
                "-o",
                f"-k {self._socket_dir}",
                "-l",
                str(self._server.pgdata / "log"),
                "start",
            ]
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        # pgserver's own cleanup would try to stop the pre-restart postmaster; it is ours now
        self._server.cleanup_mode = None
        with contextlib.suppress(Exception):
            self._server.cleanup()
        import shutil

        shutil.rmtree(self.datadir, ignore_errors=True)


# -- checks ---------------------------------------------------------------------------------------------------


@dataclass
class Execution:
    id: int
    job_id: int
    attempt: int
    cursor_key: str | None
    pid: int
    started: Any
    ended: Any
    outcome: str | None


def executions(engine: sa.Engine, table: str = EXEC_LOG) -> list[Execution]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            f"SELECT id, job_id, attempt, cursor_key, pid, started, ended, outcome FROM {table} ORDER BY id"
        ).all()
    return [Execution(*row) for row in rows]


def overlapping_on_cursor(execs: list[Execution]) -> list[tuple[Execution, Execution]]:
    """Pairs of executions of one cursor whose [started, ended] intervals overlap.

    An execution that never recorded its end (the database was gone when it
    tried) is taken to end at its next execution's start at the latest, which
    is what the check can see; the caller decides what to make of those.
    """
    by_cursor: dict[str, list[Execution]] = defaultdict(list)
    for e in execs:
        if e.cursor_key is not None:
            by_cursor[e.cursor_key].append(e)
    bad = []
    for runs in by_cursor.values():
        runs.sort(key=lambda e: e.started)
        for prev, nxt in zip(runs, runs[1:], strict=False):
            if prev.ended is not None and prev.ended > nxt.started:
                bad.append((prev, nxt))
    return bad


def job_rows(engine: sa.Engine) -> dict[int, dict[str, Any]]:
    with engine.connect() as conn:
        rows = (
            conn.exec_driver_sql(
                "SELECT id, state, attempts, max_attempts, result, errors, cursor_key FROM mq_job"
            )
            .mappings()
            .all()
        )
    return {row["id"]: dict(row) for row in rows}


def state_counts(engine: sa.Engine) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(dict(conn.exec_driver_sql("SELECT state, count(*) FROM mq_job GROUP BY state").all()))


def enqueue(engine: sa.Engine, model: Any, queue: str, method: str, args: Any, **kwargs: Any) -> int:
    """Queue one call in a committed transaction; returns the job id."""
    from sqlalchemy.orm import Session

    from psycopg2_mq import MQSource

    with Session(engine) as session, session.begin():
        return int(MQSource(dbsession=session, model=model).call(queue, method, args, **kwargs).id)


def enqueue_many(engine: sa.Engine, model: Any, calls: list[dict[str, Any]], batch: int = 1000) -> list[int]:
    """Queue calls (dicts of MQSource.call keywords) with call_many, ``batch`` per transaction."""
    from sqlalchemy.orm import Session

    from psycopg2_mq import MQSource

    ids: list[int] = []
    for start in range(0, len(calls), batch):
        with Session(engine) as session, session.begin():
            ids += MQSource(dbsession=session, model=model).call_many(calls[start : start + batch])
    return ids


def job_row(engine: sa.Engine, job_id: int) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.exec_driver_sql("SELECT * FROM mq_job WHERE id = %(id)s", {"id": job_id}).mappings().one()
    return dict(row)


def wait_for_state(engine: sa.Engine, job_id: int, *states: str, timeout: float = PATIENCE) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        row = job_row(engine, job_id)
        return row if row["state"] in states else None

    return wait_until(reached, timeout=timeout)


def count_lines(text: str, needle: str) -> int:
    return sum(needle in line for line in text.splitlines())


# -- draining many jobs through faults ------------------------------------------------------------------------


@dataclass
class DrainReport:
    """What a drain saw; ``check()`` asserts the invariants of the fault tests."""

    job_ids: list[int]
    seconds: float
    faults: list[
        tuple[float, int, float]
    ]  # (time into the drain, jobs finished then, seconds to next completion)
    statuses: list[dict[str, Any]]
    jobs: dict[int, dict[str, Any]]
    execs: list[Execution]
    #: claims found stranded (and rescued by restarting their worker): the StrandedClaims bug
    stranded: list[tuple[int, int, int]] = field(default_factory=list)

    def summary(self) -> str:
        attempts = Counter(job["attempts"] for job in self.jobs.values())
        unended = sum(e.ended is None for e in self.execs)
        discarded = sum(s.get("discarded_outcomes", 0) for s in self.statuses)
        return (
            f"{len(self.job_ids)} jobs in {self.seconds:.1f}s; executions {len(self.execs)} "
            f"(never ended: {unended}); attempts per job {dict(sorted(attempts.items()))}; "
            f"discarded outcomes {discarded}; faults (at s, finished, s to next completion) "
            + ", ".join(f"({at:.1f}, {n}, {rec:.2f})" for at, n, rec in self.faults)
            + f"; stranded claims (job, attempt, worker) rescued by a worker restart: {self.stranded}"
        )

    def raise_if_stranded(self) -> None:
        """Call after the other checks: the drain passed them, but only thanks to a rescue."""
        if self.stranded:
            raise StrandedClaims(f"claims stranded until their worker was restarted: {self.stranded}")


def drain(
    engine: sa.Engine,
    model: Any,
    fleet: WorkerFleet,
    *,
    jobs: int,
    cursors: int,
    workers: int,
    threads: int,
    fault: Callable[[], None] | None = None,
    fault_at: tuple[float, ...] = (),
    job_args: dict[str, Any] | None = None,
    call: dict[str, Any] | None = None,
    timeout: float = 240.0,
    monitor: sa.Engine | None = None,
    worker_options: dict[str, Any] | None = None,
) -> DrainReport:
    """Queue ``jobs`` jobs on ``cursors`` cursors (0: none), drain them with worker processes, inject faults.

    ``fault()`` runs when the finished fraction first reaches each of ``fault_at``.
    The workers are stopped gracefully at the end (their exit status is checked
    and their final counters collected). ``monitor`` polls the database (an
    engine with pre-ping, when faults cut connections).
    """
    monitor = monitor or engine
    calls = [
        {
            "queue": "drain",
            "method": "m",
            "args": {"n": i, **(job_args or {})},
            **({"cursor_key": f"cursor-{i % cursors}", "collapse_on_cursor": False} if cursors else {}),
            **(call or {}),
        }
        for i in range(jobs)
    ]
    job_ids = enqueue_many(engine, model, calls)
    assert len(set(job_ids)) == jobs
    procs = [
        fleet.start(
            f"drain-{i}",
            ["drain"],
            threads=threads,
            maintenance_interval=1.0,
            log_table=EXEC_LOG,
            **(worker_options or {}),
        )
        for i in range(workers)
    ]
    started = time.monotonic()
    faults: list[tuple[float, int, float]] = []
    pending_faults = sorted(fault_at)

    def finished() -> int:
        counts = state_counts(monitor)
        return sum(counts[s] for s in ("completed", "failed", "canceled"))

    done = 0
    progress = (0, time.monotonic())
    statuses: list[dict[str, Any]] = []
    stranded_seen: list[tuple[int, int, int]] = []

    def stop(proc: WorkerProc) -> None:
        assert proc.stop() == 0, proc.log()[-3000:]
        last = [line for line in proc.output().splitlines() if line.startswith("run returned ")]
        statuses.append(json.loads(last[-1][len("run returned ") :]))

    while done < jobs:
        now = time.monotonic()
        stalled = now - progress[1] > STALL_PATIENCE
        stranded = stranded_claims(monitor, model) if stalled else []
        if stranded:
            # the known bug (see StrandedClaims): note it, and rescue as an operator
            # would, by restarting the workers holding them, so that the drain can
            # finish and every other invariant still be checked
            stranded_seen += stranded
            holders = {worker for _, _, worker in stranded}
            for i, proc in enumerate(procs):
                if proc.worker_id(monitor) in holders:
                    stop(proc)
                    procs[i] = fleet.start(
                        f"{proc.name}-r",
                        ["drain"],
                        threads=threads,
                        maintenance_interval=1.0,
                        log_table=EXEC_LOG,
                        **(worker_options or {}),
                    )
            progress = (done, time.monotonic())
            continue
        assert now - started < timeout and not stalled, (
            f"drain stuck at {done}/{jobs} ({'no progress for %.0fs' % (now - progress[1]) if stalled else 'timeout'}): "
            + diagnose(monitor, model)
        )
        for proc in procs:
            assert proc.alive(), f"worker {proc.name} died:\n{proc.log()[-3000:]}"
        done = finished()
        if done > progress[0]:
            progress = (done, time.monotonic())
        if pending_faults and fault is not None and done >= pending_faults[0] * jobs:
            pending_faults.pop(0)
            at = time.monotonic()
            fault()
            # recovery: the first job finished after the fault
            wait_until(lambda before=done: finished() > before, timeout=PATIENCE, interval=0.01)
            faults.append((at - started, done, time.monotonic() - at))
        time.sleep(0.1)
    seconds = time.monotonic() - started
    for proc in procs:
        assert proc.alive(), f"worker {proc.name} died:\n{proc.log()[-3000:]}"
    for proc in procs:
        stop(proc)
    return DrainReport(
        job_ids, seconds, faults, statuses, job_rows(monitor), executions(monitor), stranded_seen
    )


#: a drain with no job finishing for this long is stuck (healthy drains never pause even 1 s)
STALL_PATIENCE = 10.0


class StrandedClaims(AssertionError):
    """The drain is stuck on jobs running under a live worker (it holds its lock) that never executed them.

    The signature of a claim that committed in the database while its reply
    never reached the worker (see ``test_claim_whose_reply_was_lost_does_not_strand_its_jobs``).
    """


def stranded_claims(engine: sa.Engine, model: Any, table: str = EXEC_LOG) -> list[tuple[int, int, int]]:
    """(job id, attempt, worker id) of every running job whose worker holds its lock but never ran it."""
    with engine.connect() as conn:
        running = conn.exec_driver_sql(
            "SELECT j.id, j.attempts, j.worker_id, EXISTS (SELECT 1 FROM pg_locks AS l WHERE l.locktype = 'advisory' "
            "AND l.granted AND l.objsubid = 2 AND l.classid = %(c)s::bigint::oid AND l.objid = j.worker_id::bigint::oid), "
            f"EXISTS (SELECT 1 FROM {table} AS e WHERE e.job_id = j.id AND e.attempt = j.attempts) "
            "FROM mq_job AS j WHERE j.state = 'running'",
            {"c": model.lock_class},
        ).all()
    if not running or not all(locked and not ran for _, _, _, locked, ran in running):
        return []
    return [(job_id, attempt, worker) for job_id, attempt, worker, _, _ in running]


def diagnose(engine: sa.Engine, model: Any) -> str:
    """What a stuck queue looks like: states, the running jobs, workers and their locks."""
    with engine.connect() as conn:
        running = conn.exec_driver_sql(
            "SELECT id, worker_id, attempts, cursor_key, start_time FROM mq_job WHERE state = 'running' "
            "ORDER BY id LIMIT 20"
        ).all()
        workers = conn.exec_driver_sql("SELECT id, name, pid, missing_since FROM mq_worker ORDER BY id").all()
        locks = conn.exec_driver_sql(
            "SELECT objid::int, pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 AND granted "
            "AND classid = %(c)s::bigint::oid",
            {"c": model.lock_class},
        ).all()
        blocked = conn.exec_driver_sql(
            "SELECT count(*) FROM mq_job AS p WHERE p.state = 'pending' AND EXISTS (SELECT 1 FROM mq_job AS h "
            "WHERE h.cursor_key = p.cursor_key AND h.state IN ('running', 'lost'))"
        ).scalar()
    return (
        f"states {dict(state_counts(engine))}; pending behind a held cursor {blocked}; "
        f"running {[tuple(r) for r in running]}; workers {[tuple(w) for w in workers]}; "
        f"locks (worker id, backend) {[tuple(x) for x in locks]}"
    )


def check_drain(report: DrainReport, expect_failed: set[int] | None = None) -> None:
    """The invariants: one final outcome per job, every attempt accounted for, cursors serial.

    Executions are logged outside the outcome's transaction (see worker_main),
    so a job may have run more than once (at-least-once delivery); what must
    hold is that each claim (job, attempt) ran at most once, that the stored
    outcome is that of the last claim, and that every earlier claim left an
    error in ``errors`` and either raised, never ended, or had its outcome
    discarded by fencing.
    """
    expect_failed = expect_failed or set()
    jobs, execs = report.jobs, report.execs
    assert set(jobs) == set(report.job_ids)
    states = Counter(job["state"] for job in jobs.values())
    assert states == Counter({"completed": len(jobs) - len(expect_failed), "failed": len(expect_failed)}), (
        states
    )
    assert {i for i, job in jobs.items() if job["state"] == "failed"} == expect_failed

    claims = Counter((e.job_id, e.attempt) for e in execs)
    twice = [claim for claim, n in claims.items() if n > 1]
    assert not twice, f"claims executed more than once: {twice[:10]}"
    per_job: dict[int, list[Execution]] = defaultdict(list)
    for e in execs:
        per_job[e.job_id].append(e)
    for job_id, job in jobs.items():
        runs = sorted(per_job[job_id], key=lambda e: e.attempt)
        assert runs, f"job {job_id} never ran"
        assert runs[-1].attempt <= job["attempts"]
        # each earlier attempt left its error
        assert len(job["errors"] or []) == job["attempts"] - 1, (job_id, job["attempts"], job["errors"])
        if job["state"] == "completed":
            # the stored outcome is the one returned by the last claim's run (the
            # result names its execution); that run's end may be unrecorded
            # (outcome NULL) if the database was down when it ended
            assert job["result"]["attempt"] == job["attempts"], (job_id, job)
            last = [e for e in runs if e.attempt == job["attempts"]]
            assert [e.id for e in last] == [job["result"]["log_id"]], (job_id, runs)
            assert last[0].outcome in ("ok", None), (job_id, runs)
    discarded = sum(s["discarded_outcomes"] for s in report.statuses)
    superseded_ok = sum(1 for e in execs if e.outcome == "ok" and jobs[e.job_id]["attempts"] != e.attempt)
    # every run that returned but is not the stored outcome was refused by fencing
    assert superseded_ok <= discarded, (superseded_ok, discarded)
    overlaps = overlapping_on_cursor(execs)
    assert not overlaps, f"{len(overlaps)} overlapping executions on a cursor, e.g. {overlaps[:3]}"
