"""Shared fixtures: every database test runs against a real PostgreSQL.

The server is ``MQ_TEST_DATABASE_URL`` when set, else an embedded PostgreSQL
(``pgserver``) started for this test session. Either way the session works in a
database of its own, created here and dropped at the end, and every test starts
with empty tables (the queue's and the workflow layer's).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from psycopg2_mq import make_default_model
from workflows import make_workflow_model

from .support import wait_until

settings.register_profile(
    "ci",
    max_examples=20,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "thorough",
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "thorough"))


def _sqlalchemy_url(url: str) -> sa.URL:
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg2")
    return u


@pytest.fixture(scope="session")
def server_url() -> Iterator[sa.URL]:
    """URL of the server's maintenance database (``postgres``)."""
    url = os.environ.get("MQ_TEST_DATABASE_URL")
    if url:
        yield _sqlalchemy_url(url)
        return
    import pgserver

    datadir = tempfile.mkdtemp(prefix="mq-test-pg-")
    server = pgserver.get_server(datadir, cleanup_mode="stop")
    try:
        yield _sqlalchemy_url(server.get_uri()).set(database="postgres")
    finally:
        server.cleanup()
        shutil.rmtree(datadir, ignore_errors=True)


@pytest.fixture(scope="session")
def create_database(server_url: sa.URL) -> Iterator[Callable[[str], sa.URL]]:
    """Factory: ``create_database(prefix)`` makes an empty database, dropped at session end."""
    created: list[str] = []
    admin = sa.create_engine(server_url.set(database="postgres"), isolation_level="AUTOCOMMIT")

    def create(prefix: str) -> sa.URL:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        created.append(name)
        return server_url.set(database=name)

    yield create
    with admin.connect() as conn:
        for name in created:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(scope="session")
def database_url(create_database: Callable[[str], sa.URL]) -> sa.URL:
    """The database this test session's queue tables live in."""
    return create_database("mq_test")


@pytest.fixture(scope="session")
def metadata() -> sa.MetaData:
    return sa.MetaData()


@pytest.fixture(scope="session")
def model(metadata: sa.MetaData):
    return make_default_model(metadata)


@pytest.fixture(scope="session")
def workflow_model(metadata: sa.MetaData, model):
    """The workflow tables, declared on the same MetaData as the queue's."""
    return make_workflow_model(metadata)


@pytest.fixture(scope="session")
def _session_engine(database_url: sa.URL, metadata: sa.MetaData, model, workflow_model) -> Iterator[sa.Engine]:
    engine = sa.create_engine(database_url, pool_size=10, max_overflow=40)
    metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def engine(_session_engine: sa.Engine, metadata: sa.MetaData) -> sa.Engine:
    """The session's engine, with every queue table emptied before the test."""
    names = ", ".join(t.fullname for t in metadata.sorted_tables)
    with _session_engine.begin() as conn:
        # not RESTART IDENTITY: worker ids double as advisory lock keys and must never repeat
        conn.exec_driver_sql(f"TRUNCATE {names}")
    return _session_engine


@pytest.fixture
def dbsession(engine: sa.Engine) -> Iterator[Session]:
    with Session(engine) as session:
        yield session


@pytest.fixture
def wait_idle(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``wait_idle(n=1)`` blocks until ``n`` workers' dispatchers sleep in a long wait.

    A test that commits only then shows the wake-up of an idle worker by NOTIFY,
    rather than a claim that happened to follow a statement already running.
    """
    from psycopg2_mq import _notify

    real_wait = _notify.wait
    lock = threading.Lock()
    sleeping: set[int] = set()

    def tracked_wait(conn: Any, waker: Any, timeout: float | None) -> bool:
        long_wait = timeout is None or timeout > 1
        if long_wait:
            with lock:
                sleeping.add(threading.get_ident())
        try:
            return real_wait(conn, waker, timeout)
        finally:
            with lock:
                sleeping.discard(threading.get_ident())

    monkeypatch.setattr(_notify, "wait", tracked_wait)

    def wait_for(n: int = 1) -> None:
        def enough() -> bool:
            with lock:
                return len(sleeping) >= n

        wait_until(enough)

    return wait_for
