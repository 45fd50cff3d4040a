"""``python -m psycopg2_mq``: the worker and init-db commands, and their error messages.

The queues the worker subprocess serves are defined in this module and named
on its command line as ``tests.test_cli:...``, the way a user names their own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from psycopg2_mq import JobStates
from psycopg2_mq.cli import main

from .support import enqueue, fetch_job, wait_until

ROOT = Path(__file__).resolve().parent.parent


class ShoutQueue:
    """A queue given as a class: the worker command creates it with no arguments."""

    def execute_job(self, job: Any) -> Any:
        return job.args["text"].upper()


class SlowQueue:
    """Sleeps ``args['seconds']``: a job still running when SIGTERM arrives."""

    def execute_job(self, job: Any) -> Any:
        time.sleep(job.args["seconds"])
        return "slept"


#: a queue given as an instance
slow_queue = SlowQueue()


class NotAQueue:
    """Has no execute_job: the worker command must refuse it."""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MQ_DATABASE_URL"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _text(url: sa.URL) -> str:
    return url.render_as_string(hide_password=False)


def _worker_count(engine: sa.Engine, model: Any) -> int:
    with engine.connect() as conn:
        return conn.scalar(sa.select(sa.func.count()).select_from(model.worker_table))


def test_worker_runs_queues_named_module_attr_and_stops_gracefully_on_sigterm(database_url, engine, model):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "psycopg2_mq",
            "worker",
            "--database-url",
            _text(database_url),
            "--queue",
            "shout=tests.test_cli:ShoutQueue",
            "--queue",
            "slow=tests.test_cli:slow_queue",
            "--threads",
            "2",
        ],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: _worker_count(engine, model) == 1 or proc.poll() is not None)
        assert proc.poll() is None, proc.communicate()[0]

        (shout_id,) = enqueue(engine, model, ("shout", "say", {"text": "hello"}))
        wait_until(lambda: fetch_job(engine, model, shout_id).state == JobStates.COMPLETED)
        assert fetch_job(engine, model, shout_id).result == "HELLO"

        (slow_id,) = enqueue(engine, model, ("slow", "nap", {"seconds": 1.5}))
        wait_until(lambda: fetch_job(engine, model, slow_id).state == JobStates.RUNNING)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    print(output)
    assert proc.returncode == 0, output
    # graceful: the job running at SIGTERM finished, and the worker unregistered
    slow = fetch_job(engine, model, slow_id)
    assert (slow.state, slow.result) == (JobStates.COMPLETED, "slept")
    assert _worker_count(engine, model) == 0
    assert "worker stopped" in output


def test_init_db_creates_the_tables_in_a_fresh_database(create_database: Callable[[str], sa.URL]):
    url = create_database("mq_cli_init")
    command = [sys.executable, "-m", "psycopg2_mq", "init-db"]
    # the URL from the environment this time
    for _ in range(2):  # a second run finds everything in place and changes nothing
        proc = subprocess.run(
            command,
            cwd=ROOT,
            env=_env(MQ_DATABASE_URL=_text(url)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert "mq_job" in proc.stdout
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            assert {"mq_job", "mq_cursor", "mq_worker"} <= set(sa.inspect(conn).get_table_names())
            triggers = set(
                conn.exec_driver_sql("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal").scalars()
            )
        assert triggers == {"mq_job_wake_on_insert", "mq_job_call_on_finish"}
    finally:
        engine.dispose()


def test_init_db_in_a_schema(create_database: Callable[[str], sa.URL], capsys):
    url = create_database("mq_cli_schema")
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE SCHEMA queue")
        assert main(["init-db", "--database-url", _text(url), "--schema", "queue"]) == 0
        assert "queue.mq_job" in capsys.readouterr().out
        with engine.connect() as conn:
            assert {"mq_job", "mq_cursor", "mq_worker"} <= set(
                sa.inspect(conn).get_table_names(schema="queue")
            )
    finally:
        engine.dispose()


def test_help_explains_the_commands():
    proc = subprocess.run(
        [sys.executable, "-m", "psycopg2_mq", "--help"], cwd=ROOT, env=_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0
    for word in ("demo", "worker", "init-db", "MQ_DATABASE_URL"):
        assert word in proc.stdout


GOOD_QUEUE = "shout=tests.test_cli:ShoutQueue"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "COMMAND"),
        (["launch"], "invalid choice"),
        (["worker", "--database-url", "postgresql://x/y"], "--queue"),
        (["worker", "--queue", GOOD_QUEUE, "--threads", "0"], "must be at least 1"),
        (["worker", "--queue", GOOD_QUEUE, "--threads", "many"], "expected a whole number"),
        (["demo", "--timeout", "-1"], "must be positive"),
    ],
)
def test_bad_arguments_exit_2_with_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err


@pytest.mark.parametrize(
    ("queue", "message"),
    [
        ("shout", "expected NAME=module:attr"),
        ("shout=tests.test_cli", "expected NAME=module:attr"),
        ("=tests.test_cli:ShoutQueue", "expected NAME=module:attr"),
        ("shout=no_such_module_for_mq:Queue", "cannot import module 'no_such_module_for_mq'"),
        ("shout=tests.test_cli:NoSuchQueue", "has no attribute 'NoSuchQueue'"),
        ("shout=tests.test_cli:NotAQueue", "has no execute_job(job) method"),
    ],
)
def test_bad_queue_specs_are_explained(queue, message, capsys):
    assert main(["worker", "--database-url", "postgresql://x/y", "--queue", queue]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and message in err


def test_a_queue_given_twice_is_refused(capsys):
    assert main(["worker", "--queue", GOOD_QUEUE, "--queue", GOOD_QUEUE]) == 1
    assert "given twice" in capsys.readouterr().err


def test_worker_and_init_db_need_a_database_url(monkeypatch, capsys):
    monkeypatch.delenv("MQ_DATABASE_URL", raising=False)
    for argv in (["worker", "--queue", GOOD_QUEUE], ["init-db"]):
        assert main(argv) == 1
        assert "MQ_DATABASE_URL" in capsys.readouterr().err


def test_an_unreachable_database_is_reported(capsys):
    # nothing listens on port 1
    assert main(["init-db", "--database-url", "postgresql://nobody@127.0.0.1:1/nothing"]) == 1
    assert "cannot connect to postgresql+psycopg2://nobody@127.0.0.1:1/nothing" in capsys.readouterr().err


def test_worker_refuses_a_database_without_the_tables(create_database, capsys):
    url = _text(create_database("mq_cli_empty"))
    assert main(["worker", "--database-url", url, "--queue", GOOD_QUEUE]) == 1
    assert "queue tables are missing" in capsys.readouterr().err


def test_init_db_needs_an_existing_schema(create_database, capsys):
    url = _text(create_database("mq_cli_noschema"))
    assert main(["init-db", "--database-url", url, "--schema", "nope"]) == 1
    assert "schema 'nope' does not exist" in capsys.readouterr().err


def test_demo_without_url_or_pgserver_says_how_to_get_one(monkeypatch, capsys):
    monkeypatch.delenv("MQ_DATABASE_URL", raising=False)
    monkeypatch.setitem(sys.modules, "pgserver", None)  # makes `import pgserver` fail
    assert main(["demo"]) == 1
    err = capsys.readouterr().err
    assert "pip install 'psycopg2_mq[embedded]'" in err and "--database-url" in err
