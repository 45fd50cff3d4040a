"""The completer's statement runner (``ExecutorPool._execute``) and connection failures.

No database: fake connections fail the way psycopg2's do.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest

from psycopg2_mq._executor import ExecutorPool


class FakeConnection:
    """Runs statements, or fails them with ``error`` (marking itself closed if ``dies``)."""

    def __init__(self, error: Exception | None = None, dies: bool = False) -> None:
        self.error, self.dies = error, dies
        self.closed = 0
        self.statements: list[str] = []

    def cursor(self) -> FakeConnection:
        return self

    def __enter__(self) -> FakeConnection:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def execute(self, sql: str, params: Any) -> None:
        if self.error is not None:
            if self.dies:
                self.closed = 2
            raise self.error
        self.statements.append(sql)

    def fetchone(self) -> tuple[int]:
        return (1,)

    def close(self) -> None:
        self.closed = 1


def _pool(connections: list[FakeConnection]) -> Iterator[ExecutorPool]:
    pool = ExecutorPool(
        threads=0,
        connect=lambda: connections.pop(0),
        queries=None,  # type: ignore[arg-type]  # _execute runs the SQL it is given
        handlers={},
        on_idle=lambda: None,
        name="test",
    )
    try:
        yield pool
    finally:
        pool.stop()


@pytest.mark.parametrize("marked_closed", [True, False], ids=["marked-closed", "not-marked"])
def test_a_connection_that_died_with_a_bare_database_error_is_replaced(marked_closed: bool) -> None:
    """psycopg2 raised a bare DatabaseError (no SQLSTATE), not OperationalError, for "server
    closed the connection unexpectedly" when PostgreSQL crashed, and left ``closed`` at 0:
    the completer gave the outcomes up and the jobs ran again."""
    error = psycopg2.DatabaseError("server closed the connection unexpectedly")
    dead = FakeConnection(error, dies=marked_closed)
    fresh = FakeConnection()
    for pool in _pool([fresh]):
        row, conn = pool._execute("SELECT 1", {}, dead)
    assert (row, conn) == ((1,), fresh)
    assert dead.closed and fresh.statements == ["SELECT 1"]


def test_an_error_on_a_live_connection_is_not_retried() -> None:
    """A refusal (the connection is fine) goes to the caller, which fails the job with it."""
    alive = FakeConnection(psycopg2.DataError("invalid input syntax"))
    for pool in _pool([]):
        with pytest.raises(psycopg2.DataError):
            pool._execute("SELECT 1", {}, alive)
    assert not alive.closed
