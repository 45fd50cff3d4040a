"""The fast enqueue paths: ``call()`` builds its job from the INSERT's RETURNING,
``call_many()`` without cursor keys inserts from column arrays.

Each test compares what the API hands back with a fresh load from the database.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from psycopg2_mq import Backoff, JobStates, MQSource


@pytest.fixture
def mq(dbsession: Session, model: Any) -> MQSource:
    return MQSource(dbsession=dbsession, model=model)


def columns(model: Any) -> list[str]:
    return [c.key for c in sa.inspect(model.Job).column_attrs]


def as_dict(job: Any, model: Any) -> dict[str, Any]:
    return {name: getattr(job, name) for name in columns(model)}


def loaded(engine: sa.Engine, model: Any, job_id: int) -> dict[str, Any]:
    """The job as a brand-new session reads it (after the caller's commit)."""
    with Session(engine) as session:
        job = session.get(model.Job, job_id)
        assert job is not None
        return as_dict(job, model)


CALLS: dict[str, dict[str, Any]] = {
    "plain": {},
    "everything": {
        "trace": {"who": "me", "n": [1, 2.5, None]},
        "on_finish": {"queue": "cb", "method": "done", "args": {"x": 1}},
        "when": timedelta(seconds=90),
        "max_attempts": 3,
        "backoff": Backoff(base=0.5, factor=3, cap=60, jitter=False),
        "lost_policy": "retry",
        "timeout": 5,  # an int: the float8 column reads back 5.0
    },
    "cursor": {"cursor_key": "acct-1", "when": datetime(2031, 1, 2, 3, 4, 5)},
    "cursor, not collapsible": {"cursor_key": "acct-2", "collapse_on_cursor": False},
    "trace null": {"trace": None},
}


@pytest.mark.parametrize("options", CALLS.values(), ids=CALLS.keys())
def test_call_returns_the_job_a_fresh_load_reads(engine, model, dbsession, mq, options):
    # jsonb normalizes: key order, and 1e20 is stored as the numeric 100000000000000000000
    args = {"b": 1, "a": [1, {"z": 1e20, "y": "ñ"}], "aa": None}
    job = mq.call("q", "m", args, **options)
    state = sa.inspect(job)
    assert state.persistent and not state.modified and not state.expired_attributes
    assert dbsession.get(model.Job, job.id) is job
    assert job.state == JobStates.PENDING and job.attempts == 0
    before_commit = as_dict(job, model)
    assert not dbsession.new and not dbsession.dirty
    dbsession.commit()
    fresh = loaded(engine, model, job.id)
    assert before_commit == fresh
    # the same types, not only equal values (a float 5 stays a float, JSON as jsonb returns it)
    assert {k: type(v) for k, v in before_commit.items()} == {k: type(v) for k, v in fresh.items()}
    assert list(before_commit["args"]) == list(fresh["args"])  # jsonb's key order


def test_call_job_is_independent_of_the_callers_objects(engine, model, dbsession, mq):
    args = {"items": [1, 2]}
    job = mq.call("q", "m", args)
    args["items"].append(3)
    assert job.args == {"items": [1, 2]}


def test_call_job_can_be_updated_and_flushed(engine, model, dbsession, mq):
    """The attached job is a normal persistent object: changes to it flush as an UPDATE."""
    job = mq.call("q", "m", {"n": 1})
    job.trace = {"edited": True}
    dbsession.commit()
    assert loaded(engine, model, job.id)["trace"] == {"edited": True}


def test_call_flushes_pending_changes_first(engine, model, dbsession, mq):
    """As Session.execute did: ORM changes pending in the session are written before the INSERT."""
    first = mq.call("q", "m", {}, cursor_key="k")
    dbsession.commit()
    first.state = JobStates.CANCELED  # pending in the session, not flushed yet
    second = mq.call("q", "m", {}, cursor_key="k")
    # with the cancel flushed first, the call cannot collapse onto the canceled job
    assert second.id != first.id
    with dbsession.no_autoflush:
        first.args = {"late": True}
        mq.call("q", "m", {})
        assert set(dbsession.dirty) == {first}


def test_call_fires_engine_events(engine, model, dbsession, mq):
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        mq.call("q", "m", {})
        mq.call_many([("q", "m", {})])
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
    assert sum("INSERT INTO" in s for s in seen) == 2


def test_call_rollback_expires_the_job(engine, model, dbsession, mq):
    job = mq.call("q", "m", {})
    job_id = job.id
    dbsession.rollback()
    assert dbsession.get(model.Job, job_id) is None


# -- call_many without cursor keys ------------------------------------------------------------


def test_call_many_plain_ids_in_input_order(engine, model, dbsession, mq):
    n = 2500
    ids = mq.call_many([("q", "m", {"i": i}) for i in range(n)])
    dbsession.commit()
    assert len(set(ids)) == n
    with Session(engine) as session:
        by_id = dict(session.execute(sa.select(model.Job.id, model.Job.args)).all())
    assert [by_id[job_id] for job_id in ids] == [{"i": i} for i in range(n)]


def test_call_many_plain_rows_match_call(engine, model, dbsession, mq):
    """Every option gives the same row through call_many as through call."""
    at = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=5)))
    calls: list[dict[str, Any]] = [
        {"args": {"n": 0}},
        {"args": [1], "trace": {"t": 1}},
        {"args": 2, "when": timedelta(seconds=60)},
        {"args": "s", "when": at},
        {"args": None, "when": datetime(2030, 1, 1)},
        {"args": {"n": 5}, "max_attempts": 4, "lost_policy": "fail", "timeout": 2.5},
        {"args": {"n": 6}, "backoff": Backoff(base=2)},
        {"args": {"n": 7}, "on_finish": {"queue": "cb", "method": "done"}},
        {"args": {"n": 8}, "timeout": timedelta(seconds=3)},
        # what an array literal must escape, or could mistake for a NULL
        {"args": {"q": 'a "quoted", {braced} \\ back\\slash', "u": "ñ ✉ \u2028"}, "trace": "NULL"},
        {"args": "NULL", "trace": {"k": "}{,"}, "lost_policy": "hold"},
    ]
    # queue names that need quoting inside an array literal, too
    queue = 'q "x", {y} \\ NULL'
    ids = mq.call_many([{"queue": queue, "method": f"m{i}", **c} for i, c in enumerate(calls)])
    single = [mq.call(queue, f"m{i}", **c).id for i, c in enumerate(calls)]
    dbsession.commit()
    volatile = {"id", "created_time", "scheduled_time"}
    for i, (bulk_id, call_id) in enumerate(zip(ids, single, strict=True)):
        bulk, one = loaded(engine, model, bulk_id), loaded(engine, model, call_id)
        assert (bulk["queue"], bulk["method"]) == (queue, f"m{i}")
        assert {k: v for k, v in bulk.items() if k not in volatile} == {
            k: v for k, v in one.items() if k not in volatile
        }
        assert bulk["scheduled_time"] - bulk["created_time"] == one["scheduled_time"] - one[
            "created_time"
        ] or (bulk["scheduled_time"] == one["scheduled_time"])


def test_call_many_mixed_batch_uses_cursor_rules(engine, model, dbsession, mq):
    """One cursor key in the batch: the cursor-aware insert handles every call, policies included."""
    ids = mq.call_many(
        [
            ("q", "a", {"n": 0}),
            {
                "queue": "q",
                "method": "b",
                "args": {},
                "cursor_key": "c",
                "max_attempts": 2,
                "backoff": Backoff(),
            },
            {"queue": "q", "method": "b", "args": {}, "cursor_key": "c"},
            {"queue": "q", "method": "d", "args": {}, "trace": {"t": 1}, "timeout": 4},
        ]
    )
    assert ids[1] == ids[2] and len(set(ids)) == 3
    dbsession.commit()
    rows = [loaded(engine, model, i) for i in ids]
    assert [r["method"] for r in rows] == ["a", "b", "b", "d"]
    assert (rows[1]["max_attempts"], rows[1]["backoff"]) == (2, Backoff().to_json())
    assert (rows[3]["trace"], rows[3]["timeout"]) == ({"t": 1}, 4.0)
    assert rows[0]["trace"] is None and rows[0]["max_attempts"] is None


def test_call_many_plain_refuses_bad_policy_before_writing(engine, model, dbsession, mq):
    with pytest.raises(ValueError):
        mq.call_many([("q", "m", {}), {"queue": "q", "method": "m", "args": {}, "max_attempts": 0}])
    with pytest.raises(TypeError):
        mq.call_many([{"queue": "q", "method": "m", "args": {}, "backoff": {"base": 1}}])
    assert dbsession.scalar(sa.select(sa.func.count()).select_from(model.Job)) == 0
