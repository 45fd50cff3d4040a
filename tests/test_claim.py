"""The claim statement itself: how it commits, and the plan it runs with.

See ``_queries.CLAIM_JOBS``: a claim of jobs without a cursor commits without
waiting for the WAL flush, a claim holding a cursor's job keeps the server's
``synchronous_commit``; and the worker's prepared claim has one generic plan,
which must stay on the indexes however many rows the table holds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from psycopg2_mq import MQSource
from psycopg2_mq._claim import claim_jobs, prepare
from psycopg2_mq._queries import Queries


@pytest.fixture
def conn(engine: sa.Engine) -> Iterator[Any]:
    """A psycopg2 connection in a transaction of its own (not autocommit)."""
    proxied = engine.raw_connection()
    try:
        yield proxied.driver_connection
    finally:
        proxied.driver_connection.rollback()
        proxied.close()


def _queue(engine: sa.Engine, model: Any, *calls: dict[str, Any]) -> None:
    with Session(engine) as session:
        source = MQSource(dbsession=session, model=model)
        for call in calls:
            source.call(**call)
        session.commit()


def _claim(conn: Any, model: Any, limit: int = 10) -> list[tuple[Any, ...]]:
    return claim_jobs(
        conn, Queries.for_model(model), lock_class=model.lock_class, worker_id=1, queues=["q"], limit=limit
    )


def _setting(conn: Any) -> str:
    with conn.cursor() as cur:
        cur.execute("SHOW synchronous_commit")
        return cur.fetchone()[0]


def test_a_claim_without_cursors_commits_asynchronously(engine: sa.Engine, model: Any, conn: Any) -> None:
    _queue(
        engine, model, {"queue": "q", "method": "m", "args": {}}, {"queue": "q", "method": "m", "args": {}}
    )
    server_setting = _setting(conn)
    assert server_setting != "off"  # else this test shows nothing
    assert len(_claim(conn, model)) == 2
    assert _setting(conn) == "off"
    conn.rollback()
    assert _setting(conn) == server_setting  # local to the claim's transaction


def test_a_claim_holding_a_cursor_keeps_the_server_setting(engine: sa.Engine, model: Any, conn: Any) -> None:
    _queue(
        engine,
        model,
        {"queue": "q", "method": "m", "args": {}},
        {"queue": "q", "method": "m", "args": {}, "cursor_key": "k"},
    )
    server_setting = _setting(conn)
    assert len(_claim(conn, model)) == 2
    assert _setting(conn) == server_setting


def test_claimed_jobs_come_in_queue_order(engine: sa.Engine, model: Any, conn: Any) -> None:
    _queue(engine, model, *({"queue": "q", "method": "m", "args": {"i": i}} for i in range(20)))
    rows = _claim(conn, model, limit=20)
    assert [row[3]["i"] for row in rows] == list(range(20))


def test_the_prepared_claim_stays_on_the_indexes_with_many_rows(engine: sa.Engine, model: Any) -> None:
    """A generic plan once joined the claimed ids to a hash of the whole table."""
    job = model.job_table.fullname
    with engine.begin() as c:
        c.exec_driver_sql(
            f"INSERT INTO {job} (queue, method, args, state, scheduled_time, end_time) "
            "SELECT 'q', 'm', '{}', 'completed', now(), now() FROM generate_series(1, 20000)"
        )
        c.exec_driver_sql(
            f"INSERT INTO {job} (queue, method, args, state, scheduled_time) "
            "SELECT 'q', 'm', '{}', 'pending', now() FROM generate_series(1, 2000)"
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.exec_driver_sql(f"ANALYZE {job}")
    proxied = engine.raw_connection()
    dbapi = proxied.driver_connection
    proxied.detach()  # SET plan_cache_mode must not go back to the pool
    try:
        dbapi.autocommit = True
        prepare(dbapi, Queries.for_model(model))
        with dbapi.cursor() as cur:
            cur.execute(
                "EXPLAIN (FORMAT JSON) EXECUTE mq_claim_jobs (%s, 4, 1, %s, %s)",
                (["q"], json.dumps({}), model.lock_class),
            )
            plan = json.dumps(cur.fetchone()[0])
    finally:
        dbapi.close()
    assert '"Seq Scan"' not in plan
    assert '"Hash Join"' not in plan
    assert "ix_mq_job_claim" in plan
