"""Bad input to MQSource is refused up front: the right exception, nothing written, session still usable.

Each case runs inside a transaction that already holds one valid job, so the
tests also prove that a refused call does not poison the caller's transaction
(PostgreSQL would abort the whole transaction on a database-side error).
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from psycopg2_mq import CallRequest, MQSource


class Opaque:
    """Some object json cannot serialize."""


def count_jobs(session: Session, model: Any) -> int:
    return int(session.scalar(sa.select(sa.func.count()).select_from(model.Job)) or 0)


def assert_refused(engine: sa.Engine, model: Any, exc_type: type[BaseException], call: Any) -> None:
    """Run ``call(mq)`` after one valid call in the same transaction and check the aftermath."""
    with Session(engine) as fresh:
        baseline = count_jobs(fresh, model)
    with Session(engine) as session:
        mq = MQSource(dbsession=session, model=model)
        mq.call("ok", "before", {"n": 1})
        with pytest.raises(exc_type):
            call(mq)
        # nothing written, and the transaction (with its earlier job) is intact
        assert count_jobs(session, model) == baseline + 1
        assert session.in_transaction()
        # the session is still usable in the same transaction
        after = mq.call("ok", "after", {"n": 2})
        assert after.id is not None
        assert count_jobs(session, model) == baseline + 2
        session.rollback()
    with Session(engine) as fresh:
        assert count_jobs(fresh, model) == baseline
    # and a clean transaction commits normally afterwards
    with Session(engine) as session, session.begin():
        MQSource(dbsession=session, model=model).call("ok", "later", {})
    with Session(engine) as fresh:
        assert count_jobs(fresh, model) == baseline + 1


NON_JSON_ARGS = {
    "set": {1, 2},
    "object": Opaque(),
    "nested object": {"a": [1, {"b": Opaque()}]},
    "nan": float("nan"),
    "inf in list": [1.0, float("inf")],
    "nul in string": "a\x00b",
    "nul in key": {"k\x00": 1},
    "bytes": b"raw",
    "date": {"when": date(2024, 1, 1)},
}


@pytest.mark.parametrize("args", NON_JSON_ARGS.values(), ids=NON_JSON_ARGS.keys())
def test_non_json_args_are_a_type_error(engine, model, args):
    assert_refused(engine, model, TypeError, lambda mq: mq.call("q", "m", args))


@pytest.mark.parametrize("args", NON_JSON_ARGS.values(), ids=NON_JSON_ARGS.keys())
def test_non_json_args_in_call_many_are_a_type_error(engine, model, args):
    assert_refused(engine, model, TypeError, lambda mq: mq.call_many([("q", "m", {}), ("q", "m", args)]))


def test_non_json_trace_is_a_type_error(engine, model):
    assert_refused(engine, model, TypeError, lambda mq: mq.call("q", "m", {}, trace={"s": {1}}))


def test_lone_surrogate_in_args_is_a_type_error(engine, model):
    assert_refused(engine, model, TypeError, lambda mq: mq.call("q", "m", {"s": "\ud800"}))


BAD_NAMES = {"empty": "", "none": None, "int": 5, "nul": "a\x00b", "list": ["q"]}


@pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_bad_queue_is_a_value_error(engine, model, name):
    assert_refused(engine, model, ValueError, lambda mq: mq.call(name, "m", {}))


@pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_bad_method_is_a_value_error(engine, model, name):
    assert_refused(engine, model, ValueError, lambda mq: mq.call("q", name, {}))


def test_bad_names_in_call_many_are_a_value_error(engine, model):
    assert_refused(engine, model, ValueError, lambda mq: mq.call_many([("q", "m", {}), ("", "m", {})]))


@pytest.mark.parametrize("cursor_key", ["", 7])
def test_bad_cursor_key_is_a_value_error(engine, model, cursor_key):
    assert_refused(engine, model, ValueError, lambda mq: mq.call("q", "m", {}, cursor_key=cursor_key))


@pytest.mark.parametrize(
    "when", ["2030-01-01T00:00:00Z", 5, 1.5, date(2030, 1, 1)], ids=["str", "int", "float", "date"]
)
def test_when_of_the_wrong_type_is_a_type_error(engine, model, when):
    assert_refused(engine, model, TypeError, lambda mq: mq.call("q", "m", {}, when=when))


def test_when_of_the_wrong_type_in_call_many_is_a_type_error(engine, model):
    assert_refused(
        engine,
        model,
        TypeError,
        lambda mq: mq.call_many([("q", "m", {}), {"queue": "q", "method": "m", "args": {}, "when": "soon"}]),
    )


def test_collapse_on_cursor_false_without_cursor_key_is_a_value_error(engine, model):
    assert_refused(engine, model, ValueError, lambda mq: mq.call("q", "m", {}, collapse_on_cursor=False))


def test_conflict_resolver_without_cursor_key_is_a_value_error(engine, model):
    def resolver(existing: Any, request: CallRequest) -> None:
        raise AssertionError("never called")

    assert_refused(engine, model, ValueError, lambda mq: mq.call("q", "m", {}, conflict_resolver=resolver))
    assert_refused(
        engine,
        model,
        ValueError,
        lambda mq: mq.call(
            "q", "m", {}, cursor_key="c", collapse_on_cursor=False, conflict_resolver=resolver
        ),
    )


def test_conflict_resolver_in_call_many_is_a_value_error(engine, model):
    entry = {
        "queue": "q",
        "method": "m",
        "args": {},
        "cursor_key": "c",
        "conflict_resolver": lambda e, r: None,
    }
    assert_refused(engine, model, ValueError, lambda mq: mq.call_many([entry]))


BAD_ON_FINISH: dict[str, tuple[Any, type[BaseException]]] = {
    "not a dict": (["cb", "done"], TypeError),
    "a string": ("cb.done", TypeError),
    "unknown key": ({"queue": "cb", "method": "done", "when": timedelta(seconds=1)}, ValueError),
    "missing queue": ({"method": "done"}, ValueError),
    "missing method": ({"queue": "cb"}, ValueError),
    "empty queue": ({"queue": "", "method": "done"}, ValueError),
    "empty cursor_key": ({"queue": "cb", "method": "done", "cursor_key": ""}, ValueError),
    "non-JSON args": ({"queue": "cb", "method": "done", "args": {"s": {1}}}, TypeError),
}


@pytest.mark.parametrize("on_finish, exc_type", BAD_ON_FINISH.values(), ids=BAD_ON_FINISH.keys())
def test_bad_on_finish_is_refused(engine, model, on_finish, exc_type):
    assert_refused(engine, model, exc_type, lambda mq: mq.call("q", "m", {}, on_finish=on_finish))


def test_unknown_call_many_keys_are_refused(engine, model):
    assert_refused(
        engine,
        model,
        TypeError,
        lambda mq: mq.call_many([{"queue": "q", "method": "m", "args": {}, "nope": 1}]),
    )
