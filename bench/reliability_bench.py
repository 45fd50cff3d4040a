"""Reliability figures: time-to-lost after SIGKILL, recovery after a PostgreSQL restart, claim latency.

    python3 bench/reliability_bench.py [--database-url URL] [--maintenance-interval 1.0] [--quick]

* **time to lost after SIGKILL** (median of 5): a worker process runs a job
  that blocks; it is SIGKILLed; an observer worker with the given
  ``maintenance_interval`` releases the job. Measured on the database clock,
  from just before the kill to the job's ``end_time`` as written by the release.
* **recovery after a PostgreSQL restart** (median of 5, always on a private
  embedded server, never on a shared one): two worker processes, one job in
  flight (lost policy ``retry``); ``pg_ctl -m fast restart``; then the time
  from the restart command to (a) the first job queued after the restart being
  completed and (b) the in-flight job being completed (its outcome written
  through the outage, or the job re-run by the lost policy), and (c) the job
  of a third worker, paused through the restart so that it never comes back,
  being marked lost: the time to lost after a restart.
* **claim latency** (p50/p95): an idle worker picks up a freshly committed job,
  from the insert's transaction time (``created_time``) to the claim
  (``start_time``), both on the database clock, with 10 k and then 1 M finished
  jobs in the table (``INSERT ... SELECT generate_series``, state completed,
  then ``VACUUM ANALYZE``), and the ratio.

Without ``--database-url`` everything runs on an embedded PostgreSQL (pgserver).
With it, a scratch database is created there (and dropped at the end) for the
SIGKILL and claim figures. ``--quick``: 3 trials and 10 k vs 100 k rows.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from psycopg2_mq import MQWorker, make_default_model  # noqa: E402
from tests.faults.helpers import (  # noqa: E402
    PrivateServer,
    db_now,
    enqueue,
    job_row,
    wait_for_state,
    wait_until,
    worker_fleet,
)


@contextlib.contextmanager
def scratch_database(server_url: sa.URL) -> Iterator[tuple[sa.Engine, Any]]:
    """A fresh database with the queue's tables; dropped afterwards."""
    name = f"mq_rbench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(server_url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    engine = sa.create_engine(server_url.set(database=name), pool_pre_ping=True)
    metadata = sa.MetaData()
    model = make_default_model(metadata)
    metadata.create_all(engine)
    try:
        yield engine, model
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def _median(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f}s (runs: {', '.join(f'{v:.3f}' for v in values)})"


# -- time to lost after SIGKILL --------------------------------------------------------------------------------


def time_to_lost(
    engine: sa.Engine, model: Any, trials: int, maintenance_interval: float, lost_after: float | None
) -> list[float]:
    results = []
    grace = {} if lost_after is None else {"lost_after": lost_after}
    with (
        tempfile.TemporaryDirectory(prefix="mq-rbench-") as tmp,
        worker_fleet(engine.url, Path(tmp)) as fleet,
    ):
        observer = fleet.start("observer", ["observer"], maintenance_interval=maintenance_interval, **grace)
        observer.wait_registered(engine)
        for trial in range(trials):
            victim = fleet.start(f"victim-{trial}", ["victim"], maintenance_interval=maintenance_interval)
            victim_id = victim.wait_registered(engine)
            job_id = enqueue(
                engine, model, "victim", "block", {"gate": str(Path(tmp) / "never")}, lost_policy="hold"
            )
            wait_until(lambda j=job_id, v=victim_id: job_row(engine, j)["worker_id"] == v)
            # the kill lands at a random point of the observer's maintenance cycle, as in life
            time.sleep(maintenance_interval * (trial + 0.5) / trials)
            killed_at = db_now(engine)
            victim.kill()
            lost = wait_for_state(
                engine, job_id, "lost", timeout=maintenance_interval * 5 + (lost_after or 0) + 30
            )
            results.append((lost["end_time"] - killed_at).total_seconds())
        observer.stop()
    return results


# -- recovery after a PostgreSQL restart ------------------------------------------------------------------------


def restart_recovery(trials: int) -> tuple[list[float], list[float], list[int], list[float]]:
    """Seconds from the restart to the first new completion and to the in-flight job's completion, the
    in-flight job's attempts, and seconds to lost for the job of a worker that does not come back."""
    server = PrivateServer()
    first_done: list[float] = []
    inflight_done: list[float] = []
    attempts: list[int] = []
    lost_after_restart: list[float] = []
    try:
        admin = sa.create_engine(server.url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql('CREATE DATABASE "mq_rbench"')
        admin.dispose()
        engine = sa.create_engine(server.url.set(database="mq_rbench"), pool_pre_ping=True)
        metadata = sa.MetaData()
        model = make_default_model(metadata)
        metadata.create_all(engine)
        with (
            tempfile.TemporaryDirectory(prefix="mq-rbench-") as tmp,
            worker_fleet(engine.url, Path(tmp)) as fleet,
        ):
            workers = [fleet.start(f"w{i}", ["work"], threads=2, maintenance_interval=1.0) for i in range(2)]
            for proc in workers:
                proc.wait_registered(engine)
            for trial in range(trials):
                # a worker that will not come back: paused through the restart, its session dies with it
                victim = fleet.start(f"victim-{trial}", ["victim"], maintenance_interval=1.0)
                victim_id = victim.wait_registered(engine)
                doomed = enqueue(
                    engine, model, "victim", "doomed", {"gate": str(Path(tmp) / "never")}, lost_policy="hold"
                )
                wait_until(lambda j=doomed, v=victim_id: job_row(engine, j)["worker_id"] == v)
                victim.pause()
                gate = Path(tmp) / f"gate-{trial}"
                inflight = enqueue(
                    engine,
                    model,
                    "work",
                    "inflight",
                    {"gate": str(gate)},
                    lost_policy="retry",
                    max_attempts=5,
                )
                wait_until(lambda j=inflight: job_row(engine, j)["state"] == "running")
                started = time.monotonic()
                server.restart()
                gate.touch()  # the in-flight job ends just after the restart
                fresh = _enqueue_when_up(engine, model)
                wait_for_state(engine, fresh, "completed", timeout=120)
                first_done.append(time.monotonic() - started)
                done = wait_for_state(engine, inflight, "completed", "failed", "lost", timeout=120)
                inflight_done.append(time.monotonic() - started)
                attempts.append(int(done["attempts"]))
                wait_for_state(engine, doomed, "lost", timeout=120)
                lost_after_restart.append(time.monotonic() - started)
                victim.kill()
                time.sleep(1.5)  # let every worker reconnect before the next trial
        engine.dispose()
    finally:
        server.close()
    return first_done, inflight_done, attempts, lost_after_restart


def _enqueue_when_up(engine: sa.Engine, model: Any) -> int:
    deadline = time.monotonic() + 60
    while True:
        try:
            return enqueue(engine, model, "work", "fresh", {})
        except sa.exc.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


# -- claim latency vs finished rows -----------------------------------------------------------------------------


class _Noop:
    def execute_job(self, job: Any) -> Any:
        return None


def _fill_finished(engine: sa.Engine, total: int) -> None:
    """Top the table up to ``total`` completed jobs, then VACUUM ANALYZE."""
    with engine.connect() as conn:
        have = conn.exec_driver_sql("SELECT count(*) FROM mq_job WHERE state = 'completed'").scalar_one()
    if total > have:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO mq_job (queue, method, args, state, result, scheduled_time, start_time, end_time, "
                "attempts, cursor_key, collapsible) "
                "SELECT 'work', 'old', jsonb_build_object('n', g), 'completed', '{}'::jsonb, "
                "now() - interval '1 day', now() - interval '1 day', now() - interval '1 day', 1, "
                "'old-' || (g %% 1000), false "
                "FROM generate_series(1, %(n)s) AS g",
                {"n": total - have},
            )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE mq_job")


def claim_latency(engine: sa.Engine, model: Any, samples: int) -> list[float]:
    worker = MQWorker(engine=engine, model=model, queues={"work": _Noop()}, maintenance_interval=3600)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: worker.get_status()["worker_id"] is not None)
        latencies = []
        for i in range(samples + 5):
            job_id = enqueue(engine, model, "work", "fresh", {}, cursor_key=f"c-{i % 7}")
            row = wait_for_state(engine, job_id, "completed")
            if i >= 5:  # warm-up: connections, plans
                latencies.append((row["start_time"] - row["created_time"]).total_seconds())
            time.sleep(0.01)  # the worker is idle, waiting on LISTEN, when the next job commits
        return latencies
    finally:
        worker.shutdown_gracefully()
        thread.join(60)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# -- main -------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", help="server for the SIGKILL and claim figures (default: embedded)")
    parser.add_argument("--maintenance-interval", type=float, default=1.0, help="observer's interval (s)")
    parser.add_argument(
        "--lost-after",
        type=float,
        default=None,
        help="observer's grace before releasing a dead worker's jobs (default: the library's, 2 intervals)",
    )
    parser.add_argument("--quick", action="store_true", help="3 trials, 10k vs 100k finished rows")
    parser.add_argument("--skip", action="append", default=[], choices=["kill", "restart", "claim"])
    args = parser.parse_args(argv)
    trials = 3 if args.quick else 5
    small, large = 10_000, 100_000 if args.quick else 1_000_000
    samples = 50 if args.quick else 200

    with contextlib.ExitStack() as stack:
        if args.database_url:
            url = sa.make_url(args.database_url)
            if url.drivername in ("postgresql", "postgres"):
                url = url.set(drivername="postgresql+psycopg2")
        else:
            url = stack.enter_context(_embedded()).url
        engine, model = stack.enter_context(scratch_database(url))
        print(f"server: {url.render_as_string(hide_password=True)}; trials {trials}", flush=True)

        if "kill" not in args.skip:
            lost = time_to_lost(engine, model, trials, args.maintenance_interval, args.lost_after)
            grace = "default (2 x interval)" if args.lost_after is None else f"{args.lost_after}s"
            print(
                f"time to lost after SIGKILL (maintenance_interval={args.maintenance_interval}s, "
                f"lost_after={grace}): {_median(lost)}",
                flush=True,
            )
        if "restart" not in args.skip:
            first, inflight, attempts, lost_after_restart = restart_recovery(trials)
            print(f"PostgreSQL restart -> first new job completed: {_median(first)}", flush=True)
            print(
                f"PostgreSQL restart -> in-flight job completed: {_median(inflight)} "
                f"(attempts: {attempts}; 1 = its outcome was written through the outage)",
                flush=True,
            )
            print(
                "PostgreSQL restart -> job of a worker that never came back marked lost "
                f"(maintenance_interval=1s, default lost_after): {_median(lost_after_restart)}",
                flush=True,
            )
        if "claim" not in args.skip:
            figures = {}
            for rows in (small, large):
                _fill_finished(engine, rows)
                lat = claim_latency(engine, model, samples)
                figures[rows] = (_pct(lat, 0.5), _pct(lat, 0.95))
                print(
                    f"claim latency with {rows:>9,} finished rows: p50 {figures[rows][0] * 1000:.2f} ms, "
                    f"p95 {figures[rows][1] * 1000:.2f} ms ({samples} samples)",
                    flush=True,
                )
            print(
                f"claim latency ratio {large:,} / {small:,} rows: p50 x{figures[large][0] / figures[small][0]:.2f}, "
                f"p95 x{figures[large][1] / figures[small][1]:.2f}",
                flush=True,
            )


@contextlib.contextmanager
def _embedded() -> Iterator[PrivateServer]:
    server = PrivateServer()
    try:
        yield server
    finally:
        server.close()


if __name__ == "__main__":
    main()
