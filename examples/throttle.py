"""Throttling with ``when`` + ``cursor_key``: many calls, one run.

    python3 examples/throttle.py [DATABASE_URL] [--calls 50] [--delay 1]

An application calls ``refresh_report`` every time something changes, maybe
hundreds of times a second, but the report should be rebuilt at most once per
``--delay`` seconds. Each call says "run this in DELAY seconds" on one cursor:
while that job is pending, further calls on the cursor collapse onto it and
queue nothing. The job runs once, DELAY seconds after the first call.

The calls are made first (each in its own transaction, like independent
requests would be), then a worker runs until the job has run. Exit status 0
only if exactly one job ran. Without a URL (or ``MQ_DATABASE_URL``) it uses an
embedded PostgreSQL (``pip install 'psycopg2_mq[embedded]'``).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from psycopg2_mq import JobStates, MQSource, MQWorker, make_default_model
from psycopg2_mq.cli import EmbeddedPostgresUnavailable, database_url_or_embedded


class ReportQueue:
    """Rebuilds a report; counts its runs (the worker's threads call it)."""

    def __init__(self) -> None:
        self.runs: list[int] = []
        self.lock = threading.Lock()

    def execute_job(self, job):
        with self.lock:
            self.runs.append(job.id)
        # the cursor survives between runs: a natural place for "rebuilt up to"
        job.cursor["rebuilds"] = job.cursor.get("rebuilds", 0) + 1
        return {"rebuilt": job.args["report"]}


def throttle(engine: sa.Engine, calls: int, delay: float) -> int:
    metadata = sa.MetaData()
    model = make_default_model(metadata)
    metadata.create_all(engine)  # only what is missing
    cursor_key = f"report-{uuid.uuid4().hex[:8]}"  # one cursor per run of this example

    started = time.monotonic()
    job_ids = set()
    for _ in range(calls):
        with Session(engine) as session, session.begin():
            mq = MQSource(dbsession=session, model=model)
            job = mq.call(
                "reports",
                "refresh_report",
                {"report": "sales"},
                when=timedelta(seconds=delay),
                cursor_key=cursor_key,
            )
            job_ids.add(job.id)
    print(
        f"made {calls} calls in {time.monotonic() - started:.2f}s -> {len(job_ids)} pending job(s): {sorted(job_ids)}"
    )

    queue = ReportQueue()
    worker = MQWorker(engine=engine, queues={"reports": queue}, model=model)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + delay + 30
        while time.monotonic() < deadline:
            with Session(engine) as session:
                states = session.scalars(
                    sa.select(model.Job.state).where(model.Job.cursor_key == cursor_key)
                ).all()
            if states and all(state in JobStates.FINISHED for state in states):
                break
            time.sleep(0.05)
    finally:
        worker.shutdown_gracefully()
        thread.join(30)

    with Session(engine) as session:
        mq = MQSource(dbsession=session, model=model)
        jobs = mq.find_jobs(cursor_key=cursor_key)
        for job in jobs:
            if job.start_time is None:
                print(f"job {job.id}: {job.state}, never started")
            else:
                waited = (job.start_time - job.created_time).total_seconds()
                print(
                    f"job {job.id}: {job.state}, started {waited:.2f}s after it was queued, result {job.result}"
                )
        print(f"cursor {cursor_key!r}: {mq.get_cursor(cursor_key)}")
    ran = [job_id for job_id in queue.runs if job_id in job_ids]
    print(f"calls made: {calls}, jobs ran: {len(ran)}")
    ok = len(job_ids) == 1 and len(ran) == 1 and all(job.state == JobStates.COMPLETED for job in jobs)
    print("OK: the calls collapsed into one run" if ok else "FAILED: expected exactly one job to run")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Many calls on one cursor_key with a delay collapse into one run."
    )
    parser.add_argument(
        "database_url", nargs="?", help="SQLAlchemy URL (default: $MQ_DATABASE_URL, else embedded)"
    )
    parser.add_argument("--calls", type=int, default=50, help="how many calls to make (default: %(default)s)")
    parser.add_argument(
        "--delay", type=float, default=1.0, help="seconds: the job's when (default: %(default)s)"
    )
    args = parser.parse_args()
    try:
        with database_url_or_embedded(args.database_url) as url:
            engine = sa.create_engine(url)
            try:
                return throttle(engine, args.calls, args.delay)
            finally:
                engine.dispose()
    except EmbeddedPostgresUnavailable as exc:  # no URL and no pgserver: say what to do
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
