"""The command line: ``python -m psycopg2_mq demo | worker | init-db``.

* ``demo`` shows the queue at work end to end (plain calls, a cursor that
  collapses calls, a delayed job, a failing job) on a database of your choice,
  or on a throwaway embedded PostgreSQL when you give none.
* ``worker`` runs an ``MQWorker`` for queues named on the command line.
* ``init-db`` creates the queue's tables (``metadata.create_all``).

``database_url_or_embedded`` and ``sqlalchemy_url`` are public so that the
examples (and your own scripts) pick a database the way the demo does;
``database_url_or_embedded`` raises ``EmbeddedPostgresUnavailable`` (with the
``pip install`` hint) when it needs ``pgserver`` and it is missing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from . import _embedded
from ._embedded import EmbeddedPostgresUnavailable, sqlalchemy_url
from .errors import FailedJobError
from .job import Job
from .model import JobStates, Model, make_default_model
from .source import MQSource
from .worker import MQWorker

__all__ = [
    "ENV_DATABASE_URL",
    "EmbeddedPostgresUnavailable",
    "build_parser",
    "database_url_or_embedded",
    "init_db",
    "load_queue",
    "main",
    "run_demo",
    "sqlalchemy_url",
]

#: the environment variable read when no ``--database-url`` is given
ENV_DATABASE_URL = "MQ_DATABASE_URL"

log = logging.getLogger("psycopg2_mq.cli")


class CommandError(Exception):
    """A problem the user can fix; printed as one line, exit status 1."""


# -- choosing a database ------------------------------------------------------------


@contextmanager
def database_url_or_embedded(url: str | None = None, *, announce: bool = True) -> Iterator[sa.URL]:
    """Yield a SQLAlchemy URL: ``url``, else ``$MQ_DATABASE_URL``, else an embedded PostgreSQL.

    The embedded server (``pgserver``, extra ``embedded``) lives in a temporary
    directory for the duration of the block. With ``announce``, a note on
    stderr says that it is being started.
    """
    chosen = url or os.environ.get(ENV_DATABASE_URL)
    if chosen:
        yield sqlalchemy_url(chosen)
        return
    if announce:
        print(
            f"no --database-url and no ${ENV_DATABASE_URL}: starting an embedded PostgreSQL "
            "(pgserver) in a temporary directory...",
            file=sys.stderr,
            flush=True,
        )
    with _embedded.embedded_postgres() as embedded_url:
        yield embedded_url


def _required_url(url: str | None) -> sa.URL:
    chosen = url or os.environ.get(ENV_DATABASE_URL)
    if not chosen:
        raise CommandError(
            f"no database: pass --database-url postgresql+psycopg2://user:password@host/dbname "
            f"or set {ENV_DATABASE_URL}"
        )
    try:
        return sqlalchemy_url(chosen)
    except sa.exc.ArgumentError as exc:
        raise CommandError(f"not a database URL: {chosen!r} ({exc})") from None


def _shown(url: sa.URL) -> str:
    return url.render_as_string(hide_password=True)


def _check_connection(engine: sa.Engine) -> None:
    try:
        with engine.connect():
            pass
    except sa.exc.DBAPIError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise CommandError(f"cannot connect to {_shown(engine.url)}: {reason}") from None


def _model(schema: str | None) -> Model:
    return make_default_model(sa.MetaData(schema=schema))


# -- init-db ------------------------------------------------------------------------------


def init_db(url: sa.URL, schema: str | None = None) -> list[str]:
    """Create the queue's tables (and triggers) that do not exist yet; returns the table names."""
    model = _model(schema)
    engine = sa.create_engine(url)
    try:
        _check_connection(engine)
        if schema is not None and not sa.inspect(engine).has_schema(schema):
            raise CommandError(f"schema {schema!r} does not exist; create it first (CREATE SCHEMA ...)")
        model.metadata.create_all(engine)
    finally:
        engine.dispose()
    return [table.fullname for table in model.metadata.sorted_tables]


def _cmd_init_db(args: argparse.Namespace) -> int:
    url = _required_url(args.database_url)
    tables = init_db(url, args.schema)
    print(f"queue tables ready in {_shown(url)}: {', '.join(tables)}")
    return 0


# -- worker ---------------------------------------------------------------------------------


def load_queue(spec: str) -> tuple[str, Any]:
    """Turn ``NAME=module:attr`` into ``(NAME, queue object)``.

    ``attr`` may be dotted (``module:Outer.Inner``). A class is instantiated
    with no arguments; anything else is used as it is. Either way the result
    must have an ``execute_job(job)`` method.
    """
    example = "e.g. --queue echo=myapp.queues:EchoQueue"
    name, sep, target = spec.partition("=")
    if not sep or not name or not target:
        raise CommandError(f"--queue {spec!r}: expected NAME=module:attr, {example}")
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise CommandError(f"--queue {spec!r}: expected NAME=module:attr, {example}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise CommandError(
            f"--queue {spec!r}: cannot import module {module_name!r} ({exc}); "
            "is it installed, or is the current directory the one that contains it?"
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CommandError(
                f"--queue {spec!r}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    if isinstance(obj, type):
        try:
            obj = obj()
        except TypeError as exc:
            raise CommandError(f"--queue {spec!r}: cannot create {attr}() without arguments: {exc}") from None
    if not callable(getattr(obj, "execute_job", None)):
        raise CommandError(f"--queue {spec!r}: {attr} has no execute_job(job) method")
    return name, obj


def _cmd_worker(args: argparse.Namespace) -> int:
    queues: dict[str, Any] = {}
    for spec in args.queue:
        name, queue = load_queue(spec)
        if name in queues:
            raise CommandError(f"queue {name!r} is given twice")
        queues[name] = queue
    url = _required_url(args.database_url)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = _model(args.schema)
    engine = sa.create_engine(url)
    try:
        _check_connection(engine)
        if not sa.inspect(engine).has_table(model.job_table.name, schema=args.schema):
            raise CommandError(
                f"the queue tables are missing in {_shown(url)}; create them with "
                "`python -m psycopg2_mq init-db` or the alembic migrations (docs/migrations.md)"
            )
        worker = MQWorker(
            engine=engine,
            queues=queues,
            model=model,
            name=args.name,
            threads=args.threads,
            capture_signals=True,
            maintenance_interval=args.maintenance_interval,
        )
        log.info(
            "starting worker for %s with %d thread(s); SIGTERM or Ctrl-C stops it",
            ", ".join(queues),
            args.threads,
        )
        worker.run()
        status = worker.get_status()
        log.info(
            "worker stopped: %d completed, %d failed, %d outcome(s) discarded",
            status["completed_jobs"],
            status["failed_jobs"],
            status["discarded_outcomes"],
        )
    finally:
        engine.dispose()
    return 0


# -- demo -------------------------------------------------------------------------------------

DEMO_QUEUE = "demo"


class DemoQueue:
    """The demo's queue: a few methods, one of which always fails."""

    def execute_job(self, job: Job) -> Any:
        if job.method == "hello":
            return f"hello, {job.args['name']}"
        if job.method == "add":
            return job.args["a"] + job.args["b"]
        if job.method == "count":
            # job.cursor is this cursor's saved state; changes are saved when the job completes
            assert job.cursor is not None
            job.cursor["runs"] = job.cursor.get("runs", 0) + 1
            job.cursor["last_job"] = job.id
            return {"run": job.cursor["runs"]}
        if job.method == "fail":
            raise ValueError(job.args["why"])
        if job.method == "refuse":
            raise FailedJobError({"refused": job.args["why"]})
        raise ValueError(f"the demo queue has no method {job.method!r}")


class _NoTraceback(logging.Formatter):
    """One line per log record: the demo's failing job is expected, its traceback is noise."""

    def formatException(self, ei: Any) -> str:  # noqa: N802 - overrides logging's name
        return ""


def _configure_demo_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if verbose:
        handler.setFormatter(logging.Formatter("  [log] %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(_NoTraceback("  [log] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("psycopg2_mq")
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    root.propagate = False


def _queue_calls(
    engine: sa.Engine, model: Model, calls: Sequence[tuple[str, dict[str, Any], dict[str, Any]]]
) -> list[int]:
    """Queue ``(method, args, options)`` calls in one transaction; returns the job ids."""
    with Session(engine) as session, session.begin():
        source = MQSource(dbsession=session, model=model)
        return [source.call(DEMO_QUEUE, method, args, **options).id for method, args, options in calls]


def _wait_finished(engine: sa.Engine, model: Model, ids: Sequence[int], timeout: float) -> bool:
    """Poll the database until every job in ``ids`` has finished; False on timeout."""
    Job = model.Job
    finished = (*JobStates.FINISHED, JobStates.LOST)
    deadline = time.monotonic() + timeout
    while True:
        with Session(engine) as session:
            done = session.scalar(sa.select(sa.func.count()).where(Job.id.in_(ids), Job.state.in_(finished)))
        if done == len(set(ids)):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _describe_result(job: Any) -> str:
    result = job.result
    if isinstance(result, dict) and isinstance(result.get("error"), dict):
        error = result["error"]
        text = f"{str(error.get('type', '?')).rsplit('.', 1)[-1]}: {error.get('message', '')}"
    elif job.state == JobStates.PENDING:
        text = "(waiting)"
    elif job.state == JobStates.RUNNING:
        text = "(running)"
    else:
        text = json.dumps(result)
    return text if len(text) <= 48 else text[:45] + "..."


def _print_jobs(jobs: Sequence[Any], notes: dict[int, str]) -> None:
    rows = [("id", "job", "state", "queued->started", "result / error", "")]
    for job in jobs:
        waited = "-"
        if job.start_time is not None:
            waited = f"{(job.start_time - job.created_time).total_seconds():.2f}s"
        rows.append(
            (
                str(job.id),
                f"{job.queue}.{job.method}",
                job.state,
                waited,
                _describe_result(job),
                notes.get(job.id, ""),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            print("  " + "  ".join("-" * width for width in widths[:-1]))


def run_demo(url: sa.URL, *, timeout: float = 30.0) -> int:
    """Run the demo against ``url``; returns the exit status (0 when every job ended as expected)."""
    engine = sa.create_engine(url)
    try:
        _check_connection(engine)
        return _demo(engine, timeout)
    finally:
        engine.dispose()


def _demo(engine: sa.Engine, timeout: float) -> int:
    metadata = sa.MetaData()
    model = make_default_model(metadata)
    metadata.create_all(engine)  # creates only what is missing
    print(f"database: {_shown(engine.url)} (queue tables ready)")

    worker = MQWorker(engine=engine, queues={DEMO_QUEUE: DemoQueue()}, model=model, threads=2)
    worker_errors: list[BaseException] = []

    def run_worker() -> None:
        try:
            worker.run()
        except BaseException as exc:  # reported below instead of dying silently in the thread
            worker_errors.append(exc)

    thread = threading.Thread(target=run_worker, name="demo-worker", daemon=True)
    thread.start()
    print(f"worker:   started in a thread, 2 threads, queue {DEMO_QUEUE!r}")

    cursor_key = f"demo-counter-{uuid.uuid4().hex[:6]}"  # fresh per run: the cursor's data persists
    notes: dict[int, str] = {}
    expected: dict[int, str] = {}
    ok = True
    try:
        # 1. one transaction; the worker sees (and is woken for) these jobs when it commits
        plain = [
            ("hello", {"name": "Andy"}, {}),
            ("hello", {"name": "Bea"}, {}),
            ("add", {"a": 2, "b": 3}, {}),
        ]
        burst = [("count", {}, {"cursor_key": cursor_key})] * 5
        later = [("hello", {"name": "Later"}, {"when": timedelta(seconds=1)})]
        failing = [("fail", {"why": "this job always fails"}, {}), ("refuse", {"why": "not today"}, {})]
        ids = _queue_calls(engine, model, plain + burst + later + failing)
        plain_ids, burst_ids = ids[:3], ids[3:8]
        later_id, fail_id, refuse_id = ids[8], ids[9], ids[10]
        print()
        print("1. queued in one transaction (MQSource.call):")
        print(f"   3 plain calls                         -> jobs {', '.join(map(str, plain_ids))}")
        print(
            f"   5 calls with one cursor_key           -> job {burst_ids[0]} ({len(set(burst_ids))} job: they collapse)"
        )
        print(f"   1 call with when=timedelta(seconds=1) -> job {later_id}")
        print(
            f"   2 calls that fail                     -> jobs {fail_id} (raises), {refuse_id} (FailedJobError)"
        )
        notes[burst_ids[0]] = "5 calls -> 1 job"
        notes[later_id] = "when=+1s"
        expected.update({i: JobStates.COMPLETED for i in plain_ids + burst_ids + [later_id]})
        expected.update({fail_id: JobStates.FAILED, refuse_id: JobStates.FAILED})
        if len(set(burst_ids)) != 1:
            print("   ! the cursor calls did not collapse into one job")
            ok = False
        ok = _wait_finished(engine, model, ids, timeout) and ok

        # 2. the cursor is free again: the next burst makes one new job, which sees the saved cursor
        burst_ids_2 = _queue_calls(engine, model, [("count", {}, {"cursor_key": cursor_key})] * 3)
        print(
            f"2. job {burst_ids[0]} done, 3 more calls on the cursor -> job {burst_ids_2[0]} "
            f"({len(set(burst_ids_2))} job), which sees the cursor job {burst_ids[0]} saved"
        )
        notes[burst_ids_2[0]] = "3 calls -> 1 job"
        expected[burst_ids_2[0]] = JobStates.COMPLETED
        if len(set(burst_ids_2)) != 1:
            ok = False
        ok = _wait_finished(engine, model, burst_ids_2, timeout) and ok
    finally:
        worker.shutdown_gracefully()
        thread.join(timeout)

    with Session(engine) as session:
        source = MQSource(dbsession=session, model=model)
        jobs = sorted((source.get_job(job_id) for job_id in expected), key=lambda job: job.id)
        cursor = source.get_cursor(cursor_key)
        print()
        print("jobs:")
        _print_jobs(jobs, notes)
        print()
        print(f"cursor {cursor_key!r}: {json.dumps(cursor)}")
        wrong = [job for job in jobs if job.state != expected[job.id]]

    status = worker.get_status()
    if thread.is_alive():
        print(f"worker:   did not stop within {timeout:.0f}s")
        ok = False
    elif worker_errors:
        print(f"worker:   crashed: {worker_errors[0]!r}")
        ok = False
    else:
        print(
            f"worker:   stopped gracefully ({status['completed_jobs']} completed, {status['failed_jobs']} failed)"
        )
    if wrong:
        for job in wrong:
            print(f"! job {job.id} is {job.state}, expected {expected[job.id]}")
        ok = False
    if cursor != {"runs": 2, "last_job": burst_ids_2[0]}:
        print("! the cursor does not hold what the two counting jobs saved")
        ok = False
    print("demo OK: every job ended as expected" if ok else "demo FAILED: see the lines marked !")
    return 0 if ok else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    _configure_demo_logging(args.verbose)
    try:
        with database_url_or_embedded(args.database_url) as url:
            return run_demo(url, timeout=args.timeout)
    except EmbeddedPostgresUnavailable as exc:
        raise CommandError(str(exc)) from None


# -- argument parsing -----------------------------------------------------------------------------

DESCRIPTION = """\
psycopg2_mq: a job queue that lives in PostgreSQL.

Jobs are rows in the table mq_job. Your code queues them with MQSource.call() in
its own transaction; workers (MQWorker) claim them and run queue.execute_job(job).
"""

EPILOG = """\
examples:
  python -m psycopg2_mq demo
      see the queue at work on a throwaway embedded PostgreSQL
  python -m psycopg2_mq init-db --database-url postgresql+psycopg2://me:secret@localhost/app
      create the tables mq_job, mq_cursor, mq_worker, mq_finished_job
  python -m psycopg2_mq worker --database-url ... --queue echo=myapp.queues:EchoQueue --threads 4
      run the jobs of queue 'echo' until SIGTERM or Ctrl-C

The database URL can also come from the environment variable MQ_DATABASE_URL.
Run `python -m psycopg2_mq COMMAND --help` for the options of a command.
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``argparse`` parser of ``python -m psycopg2_mq``."""
    parser = argparse.ArgumentParser(
        prog="python -m psycopg2_mq",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    url_help = (
        f"SQLAlchemy URL of the database, e.g. postgresql+psycopg2://user:password@host/dbname "
        f"(default: ${ENV_DATABASE_URL})"
    )

    demo = commands.add_parser(
        "demo",
        help="run a short end-to-end demonstration and print what happened",
        description=(
            "Create the queue tables, start a worker in a thread, queue a few jobs (plain calls, "
            "calls that collapse on one cursor, a job delayed by one second, failing jobs), wait for "
            "them and print a table of the results. Exits 0 if every job ended as expected.\n\n"
            f"Without --database-url or ${ENV_DATABASE_URL} it starts an embedded PostgreSQL "
            "(pip package pgserver, extra 'embedded') in a temporary directory and deletes it afterwards."
        ),
    )
    demo.add_argument("--database-url", metavar="URL", help=url_help + "; else an embedded PostgreSQL")
    demo.add_argument(
        "--timeout",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the jobs to finish (default: %(default)s)",
    )
    demo.add_argument(
        "-v", "--verbose", action="store_true", help="show the library's log, tracebacks included"
    )
    demo.set_defaults(handler=_cmd_demo)

    worker = commands.add_parser(
        "worker",
        help="run a worker for the queues you name",
        description=(
            "Run an MQWorker until SIGTERM or SIGINT (Ctrl-C), which stop it gracefully: running jobs "
            "finish, nothing new is claimed. Each --queue names a queue and the object that runs its "
            "jobs: NAME=module:attr, where attr is a class (created with no arguments) or an object, "
            "either with an execute_job(job) method. The module is imported as Python would import it "
            "from the current directory."
        ),
    )
    worker.add_argument("--database-url", metavar="URL", help=url_help)
    worker.add_argument(
        "--queue",
        action="append",
        required=True,
        metavar="NAME=module:attr",
        help="a queue to serve, e.g. echo=myapp.queues:EchoQueue (repeat for more queues)",
    )
    worker.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        metavar="N",
        help="how many jobs run at once, each on a thread of its own (default: %(default)s)",
    )
    worker.add_argument("--name", help="a name for the worker in logs and mq_worker (default: host:pid)")
    worker.add_argument(
        "--maintenance-interval",
        type=_positive_float,
        default=5.0,
        metavar="SECONDS",
        help="how often to release the jobs of dead workers and timed-out jobs (default: %(default)s)",
    )
    worker.add_argument("--schema", help="the schema of the queue tables (default: the search path)")
    worker.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="(default: %(default)s)",
    )
    worker.set_defaults(handler=_cmd_worker)

    init = commands.add_parser(
        "init-db",
        help="create the queue tables in a database",
        description=(
            "Create the tables mq_job, mq_cursor, mq_worker and mq_finished_job with their indexes and triggers "
            "(SQLAlchemy metadata.create_all); existing tables are left alone. To manage the schema "
            "with migrations instead, use the alembic history in this repository (docs/migrations.md)."
        ),
    )
    init.add_argument("--database-url", metavar="URL", help=url_help)
    init.add_argument(
        "--schema", help="an existing schema to create the tables in (default: the search path)"
    )
    init.set_defaults(handler=_cmd_init_db)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m psycopg2_mq``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except CommandError as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
