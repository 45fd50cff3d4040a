"""Fault 5: hostile names and payloads go through the whole path, stored faithfully or refused clearly.

Each case runs a real worker (in a thread) so that the names also pass
through LISTEN/NOTIFY channels, the claim, the cursor table and the
inspection API, not only through ``MQSource.call``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from psycopg2_mq import MQSource
from tests.support import RecordingQueue, running_worker

from .helpers import enqueue, job_row, wait_for_state, wait_until

pytestmark = pytest.mark.timeout(120)

HOSTILE = {
    "quotes": 'it\'s "quoted" `x`',
    "spaces": "  spaced  out  ",
    "unicode": "ñandú 日本語 🚀 \u202e",
    "sql": "x'); DROP TABLE mq_job; --",
    "dollar": "$$ $tag$ \\ %s %(id)s {job}",
    "channel-ish": 'mq_"; NOTIFY x; --',
    "long": "q" * 2000,
}


@pytest.mark.parametrize("name", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_queue_method_and_cursor_names_round_trip(engine: sa.Engine, model: Any, name: str) -> None:
    def behaviour(job: Any) -> Any:
        job.cursor["seen"] = [job.queue, job.method, job.cursor_key]
        return {"queue": job.queue, "method": job.method, "cursor_key": job.cursor_key}

    queue = RecordingQueue(behaviour)
    # an idle worker: the job can only start through the NOTIFY on the hostile name's channel
    with running_worker(engine, model, {name: queue}, poll_interval=3600, maintenance_interval=3600):
        job_id = enqueue(engine, model, name, name, {"name": name}, cursor_key=name)
        done = wait_for_state(engine, job_id, "completed", "failed")
        waiting = enqueue(engine, model, name, name, {}, cursor_key=name, when=_hour())
        with Session(engine) as session:
            mq = MQSource(dbsession=session, model=model)
            assert [
                j.id for j in mq.find_jobs(queue=name, method=name, cursor_key=name, state="completed")
            ] == [job_id]
            assert mq.get_cursor(name) == {"seen": [name, name, name]}
            reasons = mq.explain_job(waiting)["reasons"]
            assert len(reasons) == 1 and reasons[0].startswith("waiting for its time"), reasons
    assert done["state"] == "completed"
    assert done["result"] == {"queue": name, "method": name, "cursor_key": name}
    assert (done["queue"], done["method"], done["cursor_key"], done["args"]) == (
        name,
        name,
        name,
        {"name": name},
    )


def _hour() -> Any:
    from datetime import timedelta

    return timedelta(hours=1)


def test_one_megabyte_args_and_result_are_stored_faithfully(engine: sa.Engine, model: Any) -> None:
    blob = {"text": 'é"\\\n' * 65_536, "numbers": list(range(50_000)), "nested": [{"k": "v" * 100}] * 1000}
    encoded = json.dumps(blob, sort_keys=True)  # jsonb does not keep key order: compare sorted
    assert len(encoded.encode()) > 1_000_000
    digest = hashlib.sha256(encoded.encode()).hexdigest()

    def behaviour(job: Any) -> Any:
        assert hashlib.sha256(json.dumps(job.args, sort_keys=True).encode()).hexdigest() == digest
        return job.args

    with running_worker(engine, model, {"big": RecordingQueue(behaviour)}):
        job_id = enqueue(engine, model, "big", "m", blob)
        done = wait_for_state(engine, job_id, "completed", "failed")
    assert done["state"] == "completed", done["result"]
    assert done["args"] == blob and done["result"] == blob


def test_nul_characters_in_exception_messages_are_stored_visibly(engine: sa.Engine, model: Any) -> None:
    def behaviour(job: Any) -> Any:
        raise ValueError("before\x00after")

    with running_worker(engine, model, {"nul": RecordingQueue(behaviour)}):
        job_id = enqueue(engine, model, "nul", "m", {}, max_attempts=2)
        done = wait_for_state(engine, job_id, "completed", "failed")
        after = enqueue(engine, model, "nul", "m", {})  # the worker carries on
        wait_for_state(engine, after, "failed")
    assert done["state"] == "failed"
    assert done["result"]["error"]["message"] == "before\\x00after"
    assert done["result"]["error"]["type"] == "builtins.ValueError"
    # the retried attempt's error kept the same message
    assert [e["message"] for e in done["errors"]] == ["before\\x00after"]


@pytest.mark.parametrize("where", ["result", "cursor"])
def test_nul_in_a_result_or_cursor_fails_the_job_with_a_clear_error(
    engine: sa.Engine, model: Any, where: str
) -> None:
    def behaviour(job: Any) -> Any:
        if where == "cursor":
            job.cursor["bad"] = "a\x00b"
            return {}
        return {"bad": "a\x00b"}

    with running_worker(engine, model, {"nul": RecordingQueue(behaviour)}):
        job_id = enqueue(engine, model, "nul", "m", {}, cursor_key="c")
        done = wait_for_state(engine, job_id, "completed", "failed")
        after = enqueue(engine, model, "nul", "m2", {}, cursor_key="c", collapse_on_cursor=False)
        wait_for_state(engine, after, "failed")  # the cursor was freed, the worker carries on
    assert done["state"] == "failed"
    assert "NUL" in done["result"]["error"]["message"]
    with Session(engine) as session:
        assert MQSource(dbsession=session, model=model).get_cursor("c") is None  # nothing half-written


@pytest.mark.parametrize(
    ("kwargs", "exc_type"),
    [
        ({"max_attempts": 0}, ValueError),
        ({"max_attempts": "3"}, TypeError),
        ({"max_attempts": True}, TypeError),
        ({"lost_policy": "retry'; --"}, ValueError),
        ({"timeout": 0}, ValueError),
        ({"timeout": -1.5}, ValueError),
        ({"backoff": lambda attempt: 1.0}, TypeError),
    ],
    ids=[
        "attempts-0",
        "attempts-str",
        "attempts-bool",
        "lost-sql",
        "timeout-0",
        "timeout-negative",
        "backoff-callable",
    ],
)
def test_bad_policy_values_are_refused_before_anything_is_written(
    engine: sa.Engine, model: Any, kwargs: dict[str, Any], exc_type: type[Exception]
) -> None:
    with Session(engine) as session:
        mq = MQSource(dbsession=session, model=model)
        with pytest.raises(exc_type):
            mq.call("q", "m", {}, **kwargs)
        assert session.scalar(sa.select(sa.func.count()).select_from(model.Job)) == 0


@pytest.mark.parametrize(
    "timeout",
    [float("inf"), float("nan"), 1e13, 1e300],
    ids=["inf", "nan", "1e13", "1e300"],
)
def test_timeouts_that_are_no_interval_are_refused_at_call_time(
    engine: sa.Engine, model: Any, timeout: float
) -> None:
    """Regression: before 975150d a finite but huge timeout was accepted and crashed the claim."""
    with Session(engine) as session:
        with pytest.raises(ValueError):
            MQSource(dbsession=session, model=model).call("q", "m", {}, timeout=timeout)
        assert session.scalar(sa.select(sa.func.count()).select_from(model.Job)) == 0


def test_a_row_the_claim_cannot_handle_does_not_stop_the_worker(engine: sa.Engine, model: Any) -> None:
    """Defence in depth: MQSource now refuses such a timeout, but rows also come from SQL, older
    clients or migrations; one bad row must not take the workers down."""
    queue = RecordingQueue()
    with running_worker(engine, model, {"q": queue}, maintenance_interval=0.5) as worker:
        with engine.begin() as conn:
            poison = conn.exec_driver_sql(
                "INSERT INTO mq_job (queue, method, args, state, timeout) "
                "VALUES ('q', 'poison', '{}', 'pending', 1e300) RETURNING id"
            ).scalar_one()
        fine = enqueue(engine, model, "q", "fine", {})
        # whichever comes first: the fine job done, or the worker gone
        wait_until(
            lambda: (
                job_row(engine, fine)["state"] in ("completed", "failed")
                or worker.get_status()["state"] != "running"
            )
        )
        assert worker.get_status()["state"] == "running"
        assert job_row(engine, fine)["state"] == "completed"
        # the claim clamps such a timeout (at most MAX_SECONDS), so the row simply runs
        wait_until(lambda: job_row(engine, poison)["state"] == "completed")


def test_job_row_helper_sees_hostile_ids_only_as_parameters(engine: sa.Engine, model: Any) -> None:
    job_id = enqueue(engine, model, "q", "m", {"sql": "'; DELETE FROM mq_job; --"})
    assert job_row(engine, job_id)["args"] == {"sql": "'; DELETE FROM mq_job; --"}
