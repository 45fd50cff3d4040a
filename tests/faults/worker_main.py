"""A worker process for the fault-injection tests and the reliability benchmark.

Run as ``python -m tests.faults.worker_main CONFIG_JSON``. The config says which
database, queues and worker options to use; what a job does comes from its args:

* ``sleep``: seconds to sleep;
* ``gate``: a file path; the job waits until ``<gate>.<attempt>`` (with
  ``gate_per_attempt``) or ``<gate>`` exists, so a test decides when it ends;
* ``fail_pct``: the attempt raises when crc32("<job id>:<attempt>") % 100 is
  below it, a deterministic "random" failure the test can predict;
* ``cursor_mark``: the job writes its pid into its cursor.

Every execution is recorded in the table ``log_table`` (when configured) on a
connection of the job's own, *outside* the transaction that stores the outcome
(the worker writes outcomes on its own connection): a row is inserted when the
attempt starts and stamped with the database clock when it ends. So the log
holds every execution, including those whose outcome was later discarded.

Other config keys: ``threads``, ``maintenance_interval``, ``poll_interval``,
``prefetch``, ``lost_after`` and ``policy`` (the queues' JobPolicy) go to the
worker; ``pre_ping`` (default true) for the job's own engine;
``finish_retry_seconds`` shortens the completer's give-up time; and
``lose_claim_reply_once`` injects a claim whose rows never reach the worker.
The worker runs with ``capture_signals=True`` (SIGTERM stops it gracefully)
and prints ``run returned <get_status() as JSON>`` when it ends.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import zlib
from typing import Any

import psycopg2
import sqlalchemy as sa

import psycopg2_mq._executor as executor_module
from psycopg2_mq import Backoff, JobPolicy, MQWorker, make_default_model

#: a gate never opened ends the job after this long, so no process outlives a test
GATE_PATIENCE = 300.0


class FaultQueue:
    """Runs the behaviour in the job's args and records each execution."""

    def __init__(self, engine: sa.Engine | None, log_table: str | None, policy: JobPolicy | None) -> None:
        self.engine = engine
        self.log_table = log_table
        if policy is not None:
            self.policy = policy

    def execute_job(self, job: Any) -> Any:
        args = job.args if isinstance(job.args, dict) else {}
        log_id = self._record_start(job)
        outcome = "raised"
        try:
            if args.get("sleep"):
                time.sleep(float(args["sleep"]))
            gate = args.get("gate")
            if gate:
                path = f"{gate}.{job.attempt}" if args.get("gate_per_attempt") else gate
                deadline = time.monotonic() + GATE_PATIENCE
                while not os.path.exists(path):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"gate {path} never opened")
                    time.sleep(0.01)
            fail_pct = int(args.get("fail_pct", 0))
            if fail_pct and zlib.crc32(f"{job.id}:{job.attempt}".encode()) % 100 < fail_pct:
                raise RuntimeError(f"injected failure of job {job.id} attempt {job.attempt}")
            if args.get("cursor_mark") and job.cursor is not None:
                job.cursor["pid"] = os.getpid()
                job.cursor["attempt"] = job.attempt
            outcome = "ok"
            return {"pid": os.getpid(), "attempt": job.attempt, "log_id": log_id}
        finally:
            self._record_end(log_id, outcome)

    def _record_start(self, job: Any) -> int | None:
        if self.engine is None:
            return None
        # if the database is unreachable the attempt fails here, before doing anything
        with self.engine.begin() as conn:
            return int(
                conn.exec_driver_sql(
                    f"INSERT INTO {self.log_table} (job_id, attempt, cursor_key, pid, started) "
                    "VALUES (%(id)s, %(attempt)s, %(cursor_key)s, %(pid)s, clock_timestamp()) RETURNING id",
                    {"id": job.id, "attempt": job.attempt, "cursor_key": job.cursor_key, "pid": os.getpid()},
                ).scalar_one()
            )

    def _record_end(self, log_id: int | None, outcome: str) -> None:
        if self.engine is None or log_id is None:
            return
        # the database may be gone by now: the row then keeps ended NULL ("ended at
        # an unknown time"), and the job's outcome stands, so that the tests see
        # what the worker does with an outcome it cannot write yet
        try:
            with self.engine.begin() as conn:
                conn.exec_driver_sql(
                    f"UPDATE {self.log_table} SET ended = clock_timestamp(), outcome = %(o)s WHERE id = %(id)s",
                    {"id": log_id, "o": outcome},
                )
        except sa.exc.DBAPIError as exc:
            logging.getLogger("faults").warning("could not record the end of execution %s: %s", log_id, exc)


def make_policy(spec: dict[str, Any] | None) -> JobPolicy | None:
    if not spec:
        return None
    kwargs: dict[str, Any] = {k: spec[k] for k in ("max_attempts", "lost", "timeout") if k in spec}
    if "backoff" in spec:
        kwargs["backoff"] = Backoff(**spec["backoff"])
    return JobPolicy(**kwargs)


def lose_claim_reply_once() -> None:
    """Make the first claim that took jobs look, to the worker, like a dropped connection.

    The claim has committed, but the worker never sees its rows: what happens
    when PostgreSQL is restarted (or the connection cut) between the commit and
    the reply reaching the client. Only the reply is lost; the database is right.
    """
    original = MQWorker._claim
    fired = False

    def claim(self: MQWorker, limit: int) -> list[tuple[Any, ...]]:
        nonlocal fired
        rows = original(self, limit)
        if rows and not fired:
            fired = True
            logging.getLogger("faults").warning("injected: reply of a claim of %s job(s) lost", len(rows))
            self._conn.close()
            raise psycopg2.OperationalError("injected: connection lost before the claim's reply arrived")
        return rows

    MQWorker._claim = claim  # type: ignore[method-assign]


def main(config: dict[str, Any]) -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(threadName)s %(name)s %(levelname)s %(message)s",
    )
    if "finish_retry_seconds" in config:
        # shorten the completer's give-up time so that a test can outlast it
        executor_module.FINISH_RETRY_SECONDS = float(config["finish_retry_seconds"])
    if config.get("lose_claim_reply_once"):
        lose_claim_reply_once()
    name = config.get("name", f"fault-worker-{os.getpid()}")
    # tagged connections let a test find (and terminate) this worker's backends
    engine = sa.create_engine(config["url"], connect_args={"application_name": f"mq-worker:{name}"})
    job_engine = None
    if config.get("log_table"):
        # autocommit: each log write is one round trip; pre-ping: the job's own
        # pooled connections survive the faults the tests inject
        job_engine = sa.create_engine(
            config["url"],
            isolation_level="AUTOCOMMIT",
            pool_pre_ping=bool(config.get("pre_ping", True)),
            pool_size=int(config.get("threads", 1)) + 1,
            connect_args={"application_name": f"mq-job:{name}"},
        )
    policy = make_policy(config.get("policy"))
    queues = {q: FaultQueue(job_engine, config.get("log_table"), policy) for q in config["queues"]}
    worker = MQWorker(
        engine=engine,
        model=make_default_model(sa.MetaData()),
        queues=queues,
        name=name,
        threads=int(config.get("threads", 1)),
        capture_signals=True,
        maintenance_interval=float(config.get("maintenance_interval", 1.0)),
        poll_interval=float(config.get("poll_interval", 60.0)),
        prefetch=config.get("prefetch"),
        **({"lost_after": float(config["lost_after"])} if "lost_after" in config else {}),
    )
    worker.run()
    status = worker.get_status()
    print("run returned " + json.dumps(status, default=str), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
