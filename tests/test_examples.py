"""The examples and the demo run, as a user would run them: as subprocesses.

They run against this session's test database; the demo also runs with no URL
at all, on its own embedded PostgreSQL, as the README's quick start does.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from psycopg2_mq import JobStates

from .support import fetch_job, wait_until

pytestmark = pytest.mark.smoke

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
#: bound for one example or demo run; they take a few seconds
RUN_TIMEOUT = 180


def _env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess: no MQ_DATABASE_URL unless given, the checkout importable."""
    env = {k: v for k, v in os.environ.items() if k != "MQ_DATABASE_URL"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _run(*args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=_env(**extra_env),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    # shown by pytest when the test fails
    print(f"$ {' '.join(args)}\n--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}")
    return proc


@pytest.fixture
def url(database_url: sa.URL, engine: sa.Engine) -> str:
    """The test database's URL as text, with its tables emptied (``engine``)."""
    return database_url.render_as_string(hide_password=False)


def test_echo_worker_runs_a_job_from_echo_source_and_stops_on_sigterm(url, engine, model):
    worker = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "echo_worker.py"), url],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # registered in mq_worker: holding its liveness lock and listening
        wait_until(lambda: _worker_count(engine, model) == 1 or worker.poll() is not None)
        assert worker.poll() is None, worker.communicate()[0]

        source = _run(str(EXAMPLES / "echo_source.py"), url, "Andy")
        assert source.returncode == 0
        match = re.search(r"queued job=(\d+)", source.stdout)
        assert match, source.stdout
        job_id = int(match.group(1))

        wait_until(lambda: fetch_job(engine, model, job_id).state == JobStates.COMPLETED)
        assert fetch_job(engine, model, job_id).result == 'hello, Andy from method="hello"'

        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    print(output)
    assert worker.returncode == 0, output
    # a graceful stop unregisters the worker
    assert _worker_count(engine, model) == 0


def _worker_count(engine: sa.Engine, model) -> int:
    with engine.connect() as conn:
        return conn.scalar(sa.select(sa.func.count()).select_from(model.worker_table))


def test_echo_examples_need_a_url():
    for script in ("echo_worker.py", "echo_source.py"):
        proc = _run(str(EXAMPLES / script))
        assert proc.returncode != 0
        assert "usage:" in proc.stderr and "MQ_DATABASE_URL" in proc.stderr


def test_throttle_collapses_many_calls_into_one_run(url, engine, model):
    proc = _run(str(EXAMPLES / "throttle.py"), url, "--calls", "50", "--delay", "1")
    assert proc.returncode == 0
    assert "calls made: 50, jobs ran: 1" in proc.stdout
    with engine.connect() as conn:
        states = conn.execute(sa.select(model.job_table.c.state)).scalars().all()
    assert states == [JobStates.COMPLETED]


def test_throttle_reads_the_url_from_the_environment(url, engine, model):
    proc = _run(str(EXAMPLES / "throttle.py"), "--calls", "5", "--delay", "0.2", MQ_DATABASE_URL=url)
    assert proc.returncode == 0
    assert "calls made: 5, jobs ran: 1" in proc.stdout


def test_demo_with_a_database_url(url, engine, model):
    proc = _run("-m", "psycopg2_mq", "demo", "--database-url", url)
    assert proc.returncode == 0
    assert "demo OK" in proc.stdout
    with engine.connect() as conn:
        counts = dict(
            conn.execute(
                sa.select(model.job_table.c.state, sa.func.count()).group_by(model.job_table.c.state)
            ).all()
        )
    # 3 plain + 1 collapsed burst + 1 delayed + 1 second burst completed; 2 failed
    assert counts == {JobStates.COMPLETED: 6, JobStates.FAILED: 2}


def test_demo_without_a_url_uses_an_embedded_postgresql():
    proc = _run("-m", "psycopg2_mq", "demo")
    assert proc.returncode == 0
    assert "embedded PostgreSQL" in proc.stderr
    assert "demo OK" in proc.stdout


def test_pipeline_example(url):
    script = EXAMPLES / "pipeline.py"
    if not script.exists():
        pytest.skip("examples/pipeline.py does not exist yet (written with the workflows layer)")
    proc = _run(str(script), url, MQ_DATABASE_URL=url)
    assert proc.returncode == 0
