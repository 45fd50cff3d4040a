"""Fixtures of the fault-injection suite.

The session's database (``engine``/``database_url`` from ``tests/conftest.py``)
serves the tests that kill, pause or disconnect workers; ``pg_terminate_backend``
is only ever aimed at connections to that database. Tests that restart
PostgreSQL use a private server of their own (``private_pg``): the shared one
is never restarted.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from .helpers import PrivateServer, WorkerFleet, create_exec_log, worker_fleet


@pytest.fixture
def exec_log(engine: sa.Engine) -> str:
    """An empty execution log in the session database."""
    return create_exec_log(engine)


@pytest.fixture
def fleet(database_url: sa.URL, tmp_path: Path) -> Iterator[WorkerFleet]:
    """Worker processes on the session database; any left running are killed at the end."""
    with worker_fleet(database_url, tmp_path) as workers:
        yield workers


@pytest.fixture(scope="session")
def private_server() -> Iterator[PrivateServer]:
    server = PrivateServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def _private_engine(private_server: PrivateServer, metadata: sa.MetaData, model) -> Iterator[sa.Engine]:
    admin = sa.create_engine(private_server.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql('CREATE DATABASE "mq_faults"')
    admin.dispose()
    # pre_ping: the test's own pooled connections survive the restarts it causes
    engine = sa.create_engine(private_server.url.set(database="mq_faults"), pool_pre_ping=True)
    metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def private_pg(
    _private_engine: sa.Engine, private_server: PrivateServer, metadata: sa.MetaData
) -> PrivateServer:
    """A private PostgreSQL with empty queue tables and exec log; ``.engine`` reaches it."""
    names = ", ".join(t.fullname for t in metadata.sorted_tables)
    with _private_engine.begin() as conn:
        conn.exec_driver_sql(f"TRUNCATE {names}")
    create_exec_log(_private_engine)
    private_server.engine = _private_engine
    return private_server
