"""MQSource: queueing in the caller's transaction, cursors, ``when``, inspection and management.

Every test checks the database itself (from a second session where visibility
matters), not only what the API returns.
"""

from __future__ import annotations

import select
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from psycopg2_mq import (
    CallRequest,
    FailedJobError,
    InvalidJobStateError,
    JobNotFoundError,
    JobStates,
    MQSource,
)
from psycopg2_mq._notify import channel_for

from .support import RecordingQueue, enqueue, fetch_job, running_worker, wait_until

ODD_QUEUE = 'we\'ird "queue" ñ ✉ with spaces'


# -- helpers -------------------------------------------------------------------------


@pytest.fixture
def mq(dbsession: Session, model: Any) -> MQSource:
    return MQSource(dbsession=dbsession, model=model)


def count_jobs(session: Session, model: Any, **where: Any) -> int:
    query = sa.select(sa.func.count()).select_from(model.Job)
    for column, value in where.items():
        query = query.where(getattr(model.Job, column) == value)
    return int(session.scalar(query) or 0)


def committed_count(engine: sa.Engine, model: Any, **where: Any) -> int:
    """Rows visible to a brand-new session, i.e. committed."""
    with Session(engine) as session:
        return count_jobs(session, model, **where)


def enqueue_together(
    engine: sa.Engine, model: Any, *calls: tuple[tuple[Any, ...], dict[str, Any]]
) -> list[int]:
    """Queue ``(call, options)`` pairs in one committed transaction.

    One commit means one wake-up, which keeps these tests clear of the
    lost-wake-up race shown by ``test_notify_read_during_a_statement_still_wakes_the_worker``.
    """
    with Session(engine) as session, session.begin():
        mq = MQSource(dbsession=session, model=model)
        return [mq.call(*call, **options).id for call, options in calls]


def set_state(engine: sa.Engine, model: Any, job_id: int, state: str, **values: Any) -> None:
    """Force a job into ``state`` with plain SQL (what a worker or a crash would do)."""
    with engine.begin() as conn:
        conn.execute(sa.update(model.Job).where(model.Job.id == job_id).values(state=state, **values))


@pytest.fixture
def listener(engine: sa.Engine) -> Iterator[Any]:
    """A raw autocommit psycopg2 connection, to LISTEN like a worker does."""
    proxied = engine.raw_connection()
    conn = proxied.driver_connection
    proxied.detach()
    conn.autocommit = True
    yield conn
    conn.close()


def drain_notifies(conn: Any, timeout: float = 0.0) -> list[str]:
    """Channels of the notifications received so far (waiting up to ``timeout``)."""
    if select.select([conn], [], [], timeout)[0]:
        conn.poll()
    channels = [n.channel for n in conn.notifies]
    conn.notifies.clear()
    return channels


# -- call: transactions and visibility --------------------------------------------------


def test_call_returns_pending_job_visible_only_after_commit(engine, model, dbsession, mq):
    """call() returns the ORM job; it is written in the caller's transaction and never committed by MQSource."""
    job = mq.call("echo", "hello", {"name": "Andy"})
    assert isinstance(job, model.Job)
    assert isinstance(job.id, int)
    assert (job.queue, job.method, job.args, job.state) == (
        "echo",
        "hello",
        {"name": "Andy"},
        JobStates.PENDING,
    )
    assert job.cursor_key is None
    # visible in the caller's own transaction, invisible to everyone else
    assert count_jobs(dbsession, model) == 1
    assert dbsession.in_transaction()
    assert committed_count(engine, model) == 0
    dbsession.commit()
    stored = fetch_job(engine, model, job.id)
    assert (stored.state, stored.args, stored.queue, stored.method) == (
        JobStates.PENDING,
        {"name": "Andy"},
        "echo",
        "hello",
    )


def test_rollback_leaves_nothing(engine, model, dbsession, mq):
    mq.call("echo", "hello", [1, 2, 3], cursor_key="k", trace={"who": "me"})
    mq.call_many([("echo", "a", {}), ("echo", "b", {})])
    assert count_jobs(dbsession, model) == 3
    dbsession.rollback()
    assert committed_count(engine, model) == 0
    assert count_jobs(dbsession, model) == 0


@pytest.mark.parametrize("queue", ["Mail.Outbox", ODD_QUEUE])
def test_notify_is_delivered_only_at_commit(engine, model, dbsession, mq, listener, queue):
    """Workers LISTEN on channel_for(queue); the NOTIFY of an enqueue arrives with the commit, not before."""
    channel = channel_for(queue)
    with listener.cursor() as cur:
        cur.execute(f'LISTEN "{channel}"')
    mq.call(queue, "send", {"to": "a@example.com"})
    dbsession.flush()
    assert drain_notifies(listener, 0.2) == []
    dbsession.commit()
    received: list[str] = []
    wait_until(lambda: received.extend(drain_notifies(listener, 0.1)) or channel in received)
    assert set(received) == {channel}


def test_call_many_notifies_at_commit_only(engine, model, dbsession, mq, listener):
    channel = channel_for("Mail.Outbox")
    with listener.cursor() as cur:
        cur.execute(f'LISTEN "{channel}"')
    mq.call_many([("Mail.Outbox", "send", {"n": 1}), ("Mail.Outbox", "send", {"n": 2})])
    assert drain_notifies(listener, 0.2) == []
    dbsession.rollback()
    assert drain_notifies(listener, 0.2) == []  # a rolled back enqueue wakes nobody
    mq.call_many([("Mail.Outbox", "send", {"n": 3})])
    dbsession.commit()
    received: list[str] = []
    wait_until(lambda: received.extend(drain_notifies(listener, 0.1)) or channel in received)


# -- cursors: collapsing -------------------------------------------------------------------


def test_second_call_collapses_onto_pending_job(engine, model, dbsession, mq):
    first = mq.call("sync", "pull", {"n": 1}, cursor_key="acct-1")
    second = mq.call("sync", "pull", {"n": 2}, cursor_key="acct-1")
    assert second.id == first.id
    assert count_jobs(dbsession, model) == 1
    dbsession.commit()
    assert committed_count(engine, model) == 1
    assert fetch_job(engine, model, first.id).args == {"n": 1}  # the later call was ignored
    # the same holds across transactions
    with Session(engine) as other, other.begin():
        third = MQSource(dbsession=other, model=model).call("sync", "pull", {"n": 3}, cursor_key="acct-1")
        assert third.id == first.id
    assert committed_count(engine, model) == 1


def test_collapse_on_cursor_false_queues_a_new_job(engine, model, dbsession, mq):
    first = mq.call("sync", "pull", {"n": 1}, cursor_key="acct-1")
    second = mq.call("sync", "pull", {"n": 2}, cursor_key="acct-1", collapse_on_cursor=False)
    third = mq.call("sync", "pull", {"n": 3}, cursor_key="acct-1", collapse_on_cursor=False)
    assert len({first.id, second.id, third.id}) == 3
    dbsession.commit()
    assert committed_count(engine, model, cursor_key="acct-1", state=JobStates.PENDING) == 3
    assert fetch_job(engine, model, second.id).collapsible is False
    # a collapsible call still collapses onto the collapsible pending job only
    again = MQSource(dbsession=dbsession, model=model).call("sync", "pull", {"n": 4}, cursor_key="acct-1")
    assert again.id == first.id


def test_conflict_resolver_updates_the_pending_job(engine, model, dbsession, mq):
    calls: list[tuple[Any, CallRequest]] = []

    def merge(existing: Any, request: CallRequest) -> None:
        calls.append((existing, request))
        existing.args = {"ids": sorted(set(existing.args["ids"]) | set(request.args["ids"]))}

    first = mq.call("index", "reindex", {"ids": [1, 2]}, cursor_key="idx", conflict_resolver=merge)
    assert calls == []  # nothing to resolve: the job was queued
    second = mq.call("index", "reindex", {"ids": [2, 3]}, cursor_key="idx", conflict_resolver=merge)
    assert second.id == first.id
    assert len(calls) == 1
    existing, request = calls[0]
    assert existing.id == first.id and existing.state == JobStates.PENDING
    assert isinstance(request, CallRequest)
    assert (request.queue, request.method, request.args, request.cursor_key) == (
        "index",
        "reindex",
        {"ids": [2, 3]},
        "idx",
    )
    dbsession.commit()
    assert committed_count(engine, model) == 1
    assert fetch_job(engine, model, first.id).args == {"ids": [1, 2, 3]}


def test_conflict_resolver_may_update_args_in_place(engine, model, dbsession, mq):
    def merge_in_place(existing: Any, request: CallRequest) -> None:
        existing.args["ids"].extend(request.args["ids"])

    first = mq.call("index", "reindex", {"ids": [1]}, cursor_key="idx")
    dbsession.commit()
    again = mq.call("index", "reindex", {"ids": [2]}, cursor_key="idx", conflict_resolver=merge_in_place)
    assert again.id == first.id
    assert again.args == {"ids": [1, 2]}  # what the caller sees...
    dbsession.commit()
    assert fetch_job(engine, model, first.id).args == {"ids": [1, 2]}  # ...must be what is stored


def test_collapse_does_not_target_a_running_job(engine, model, dbsession, mq):
    (running_id,) = enqueue(engine, model, ("sync", "pull", {"n": 1}), cursor_key="acct-1")
    set_state(engine, model, running_id, JobStates.RUNNING, start_time=sa.func.now(), attempts=1)
    job = mq.call("sync", "pull", {"n": 2}, cursor_key="acct-1")
    assert job.id != running_id
    assert job.state == JobStates.PENDING
    dbsession.commit()
    assert committed_count(engine, model, cursor_key="acct-1") == 2
    assert fetch_job(engine, model, running_id).state == JobStates.RUNNING


# -- when -------------------------------------------------------------------------------------


def test_when_aware_naive_and_timedelta(engine, model, dbsession, mq):
    aware = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=5)))
    naive = datetime(2031, 5, 6, 7, 8, 9, 123456)
    a = mq.call("q", "m", {}, when=aware)
    n = mq.call("q", "m", {}, when=naive)
    d = mq.call("q", "m", {}, when=timedelta(seconds=30))
    dbsession.commit()
    assert fetch_job(engine, model, a.id).scheduled_time == aware
    assert fetch_job(engine, model, n.id).scheduled_time == naive.replace(tzinfo=timezone.utc)
    # relative to the database clock: created_time is now() of the same transaction
    stored = fetch_job(engine, model, d.id)
    assert stored.scheduled_time - stored.created_time == timedelta(seconds=30)


def test_past_when_runs_immediately(engine, model, wait_idle):
    queue = RecordingQueue()
    with running_worker(engine, model, {"q": queue}, poll_interval=3600, maintenance_interval=3600):
        wait_idle()
        job_id, naive_id = enqueue_together(
            engine,
            model,
            (("q", "m", {}), {"when": datetime.now(timezone.utc) - timedelta(hours=1)}),
            (("q", "m", {}), {"when": datetime(2000, 1, 1)}),
        )
        wait_until(lambda: fetch_job(engine, model, job_id).state == JobStates.COMPLETED)
        wait_until(lambda: fetch_job(engine, model, naive_id).state == JobStates.COMPLETED)


# -- call_many ------------------------------------------------------------------------------------


def test_call_many_returns_ids_in_order(engine, model, dbsession, mq):
    ids = mq.call_many(
        [
            ("q", "a", {"n": 0}),
            {"queue": "q", "method": "b", "args": {"n": 1}, "trace": {"t": 1}},
            ("r", "c", [2]),
            {"queue": "q", "method": "d", "args": 3, "when": timedelta(seconds=60)},
        ]
    )
    assert len(ids) == 4 and len(set(ids)) == 4
    dbsession.commit()
    rows = {i: fetch_job(engine, model, i) for i in ids}
    assert [(rows[i].queue, rows[i].method, rows[i].args) for i in ids] == [
        ("q", "a", {"n": 0}),
        ("q", "b", {"n": 1}),
        ("r", "c", [2]),
        ("q", "d", 3),
    ]
    assert rows[ids[1]].trace == {"t": 1}
    assert all(rows[i].state == JobStates.PENDING for i in ids)
    assert rows[ids[3]].scheduled_time - rows[ids[3]].created_time == timedelta(seconds=60)
    assert committed_count(engine, model) == 4


def test_call_many_collapses_within_batch_and_onto_pending(engine, model, dbsession, mq):
    pending = mq.call("sync", "pull", {"n": 0}, cursor_key="old")
    ids = mq.call_many(
        [
            {"queue": "sync", "method": "pull", "args": {"n": 1}, "cursor_key": "new"},
            {"queue": "sync", "method": "pull", "args": {"n": 2}, "cursor_key": "new"},
            {"queue": "sync", "method": "pull", "args": {"n": 3}, "cursor_key": "old"},
            {
                "queue": "sync",
                "method": "pull",
                "args": {"n": 4},
                "cursor_key": "new",
                "collapse_on_cursor": False,
            },
            ("sync", "pull", {"n": 5}),
        ]
    )
    assert ids[0] == ids[1]
    assert ids[2] == pending.id
    assert len({ids[0], ids[3], ids[4], pending.id}) == 4
    dbsession.commit()
    assert committed_count(engine, model) == 4
    assert fetch_job(engine, model, ids[0]).args == {"n": 1}
    assert fetch_job(engine, model, pending.id).args == {"n": 0}


def test_call_many_validates_everything_before_writing(engine, model, dbsession, mq):
    mq.call("q", "before", {})
    with pytest.raises(TypeError):
        mq.call_many([("q", "a", {}), ("q", "b", {"bad": {1, 2}}), ("q", "c", {})])
    assert count_jobs(dbsession, model) == 1
    assert mq.call_many([]) == []
    assert mq.call_many(iter([])) == []
    dbsession.commit()
    assert committed_count(engine, model) == 1


# -- inspecting -----------------------------------------------------------------------------------


def test_get_job_find_jobs_and_get_cursor(engine, model, dbsession, mq):
    a = mq.call("mail", "send", {"n": 1})
    b = mq.call("mail", "bounce", {"n": 2}, cursor_key="c1")
    c = mq.call("sms", "send", {"n": 3}, cursor_key="c2")
    d = mq.call("mail", "send", {"n": 4})
    dbsession.commit()
    set_state(engine, model, d.id, JobStates.FAILED)
    dbsession.expire_all()

    assert mq.get_job(a.id).args == {"n": 1}
    assert mq.get_job(10**12) is None

    def ids(**kw: Any) -> list[int]:
        return [j.id for j in mq.find_jobs(**kw)]

    assert ids() == [d.id, c.id, b.id, a.id]  # newest first
    assert ids(queue="mail") == [d.id, b.id, a.id]
    assert ids(method="send") == [d.id, c.id, a.id]
    assert ids(queue="mail", method="send") == [d.id, a.id]
    assert ids(state="pending") == [c.id, b.id, a.id]
    assert ids(state=["failed"]) == [d.id]
    assert ids(state=("failed", "pending"), queue="sms") == [c.id]
    assert ids(state=[]) == []
    assert ids(cursor_key="c1") == [b.id]
    assert ids(limit=2) == [d.id, c.id]
    assert ids(limit=None) == [d.id, c.id, b.id, a.id]
    with pytest.raises(ValueError, match="unknown"):
        mq.find_jobs(state="done")
    with pytest.raises(ValueError, match="unknown"):
        mq.find_jobs(state=["pending", "nope"])

    assert mq.get_cursor("c1") is None  # no job completed on it yet


def test_get_cursor_after_completion(engine, model, mq):
    def bump(job: Any) -> None:
        job.cursor["seen"] = job.cursor.get("seen", 0) + 1

    with running_worker(engine, model, {"q": RecordingQueue(bump)}):
        (job_id,) = enqueue(engine, model, ("q", "m", {}), cursor_key="cur")
        wait_until(lambda: fetch_job(engine, model, job_id).state == JobStates.COMPLETED)
    assert mq.get_cursor("cur") == {"seen": 1}


# -- cancel_job -----------------------------------------------------------------------------------


def test_cancel_pending_job(engine, model, dbsession, mq):
    job = mq.call("q", "m", {})
    dbsession.commit()
    assert mq.cancel_job(job.id) is True
    assert job.state == JobStates.CANCELED  # the session's copy is refreshed
    assert fetch_job(engine, model, job.id).state == JobStates.PENDING  # not committed yet
    dbsession.commit()
    stored = fetch_job(engine, model, job.id)
    assert stored.state == JobStates.CANCELED
    assert stored.end_time is not None
    assert mq.cancel_job(job.id) is False  # already canceled


@pytest.mark.parametrize("state", [JobStates.RUNNING, JobStates.COMPLETED, JobStates.FAILED, JobStates.LOST])
def test_cancel_non_pending_job_changes_nothing(engine, model, dbsession, mq, state):
    (job_id,) = enqueue(engine, model, ("q", "m", {}))
    set_state(engine, model, job_id, state, result={"kept": True})
    assert mq.cancel_job(job_id) is False
    dbsession.commit()
    stored = fetch_job(engine, model, job_id)
    assert (stored.state, stored.result, stored.end_time) == (state, {"kept": True}, None)


def test_cancel_unknown_job(mq):
    with pytest.raises(JobNotFoundError):
        mq.cancel_job(10**12)


# -- retry_job ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [JobStates.FAILED, JobStates.CANCELED, JobStates.COMPLETED])
def test_retry_finished_job(engine, model, dbsession, mq, state):
    (job_id,) = enqueue(engine, model, ("q", "m", {"x": [1, 2]}), cursor_key="cur", trace={"who": "alice"})
    set_state(engine, model, job_id, state, result={"r": 1})
    new = mq.retry_job(job_id)
    assert new.id != job_id
    assert committed_count(engine, model) == 1  # retry_job does not commit either
    dbsession.commit()
    stored = fetch_job(engine, model, new.id)
    assert (stored.queue, stored.method, stored.args, stored.cursor_key, stored.state) == (
        "q",
        "m",
        {"x": [1, 2]},
        "cur",
        JobStates.PENDING,
    )
    assert stored.trace == {"who": "alice", "retry_of": job_id}
    original = fetch_job(engine, model, job_id)
    assert (original.state, original.result) == (state, {"r": 1})


def test_retry_job_without_trace_records_retry_of(engine, model, dbsession, mq):
    (job_id,) = enqueue(engine, model, ("q", "m", {}))
    set_state(engine, model, job_id, JobStates.FAILED)
    new = mq.retry_job(job_id)
    dbsession.commit()
    assert fetch_job(engine, model, new.id).trace["retry_of"] == job_id


@pytest.mark.parametrize("state", [JobStates.PENDING, JobStates.RUNNING])
def test_retry_rejects_unfinished_jobs(engine, model, dbsession, mq, state):
    (job_id,) = enqueue(engine, model, ("q", "m", {}))
    set_state(engine, model, job_id, state)
    with pytest.raises(InvalidJobStateError):
        mq.retry_job(job_id)
    dbsession.rollback()
    assert committed_count(engine, model) == 1
    assert fetch_job(engine, model, job_id).state == state


def test_retry_unknown_job(mq):
    with pytest.raises(JobNotFoundError):
        mq.retry_job(10**12)


def test_retry_lost_job_fails_it_and_frees_its_cursor(engine, model, dbsession, mq, wait_idle):
    """A lost job holds its cursor; retrying it fails it and the retry can run."""
    (lost_id,) = enqueue(engine, model, ("q", "m", {"a": 1}), cursor_key="cur")
    set_state(
        engine, model, lost_id, JobStates.LOST, start_time=sa.func.now(), end_time=sa.func.now(), attempts=1
    )
    queue = RecordingQueue()
    with running_worker(engine, model, {"q": queue}, poll_interval=3600, maintenance_interval=3600):
        wait_idle()
        # a sentinel proves the worker is claiming while the cursor is held
        blocked_id, sentinel_id = enqueue_together(
            engine,
            model,
            (("q", "m", {"b": 1}), {"cursor_key": "cur", "collapse_on_cursor": False}),
            (("q", "sentinel", {}), {}),
        )
        wait_until(lambda: fetch_job(engine, model, sentinel_id).state == JobStates.COMPLETED)
        assert fetch_job(engine, model, blocked_id).state == JobStates.PENDING

        new = mq.retry_job(lost_id)
        assert new.id not in (lost_id, blocked_id)
        wait_idle()
        dbsession.commit()
        lost = fetch_job(engine, model, lost_id)
        assert lost.state == JobStates.FAILED
        assert lost.result["error"]["type"] == "LostJob"
        wait_until(lambda: fetch_job(engine, model, new.id).state == JobStates.COMPLETED)
        wait_until(lambda: fetch_job(engine, model, blocked_id).state == JobStates.COMPLETED)
    assert fetch_job(engine, model, new.id).result == {"echo": {"a": 1}}
    assert fetch_job(engine, model, new.id).trace == {"original_trace": None, "retry_of": lost_id}


# -- fail_lost_job -------------------------------------------------------------------------------------


def test_fail_lost_job_frees_cursor(engine, model, dbsession, mq, wait_idle):
    (lost_id,) = enqueue(engine, model, ("q", "m", {}), cursor_key="cur")
    set_state(engine, model, lost_id, JobStates.LOST, attempts=1)
    queue = RecordingQueue()
    with running_worker(engine, model, {"q": queue}, poll_interval=3600, maintenance_interval=3600):
        wait_idle()
        waiting_id, sentinel_id = enqueue_together(
            engine, model, (("q", "next", {}), {"cursor_key": "cur"}), (("q", "sentinel", {}), {})
        )
        wait_until(lambda: fetch_job(engine, model, sentinel_id).state == JobStates.COMPLETED)
        assert fetch_job(engine, model, waiting_id).state == JobStates.PENDING

        returned = mq.fail_lost_job(lost_id)
        assert returned.id == lost_id and returned.state == JobStates.FAILED
        wait_idle()
        dbsession.commit()
        # the cursor-freed NOTIFY (poll_interval is an hour) starts the waiting job
        wait_until(lambda: fetch_job(engine, model, waiting_id).state == JobStates.COMPLETED)
    lost = fetch_job(engine, model, lost_id)
    assert lost.state == JobStates.FAILED
    assert set(lost.result["error"]) >= {"type", "message"}
    assert lost.result["error"]["type"] == "LostJob"


def test_fail_lost_job_with_given_result(engine, model, dbsession, mq):
    (lost_id,) = enqueue(engine, model, ("q", "m", {}))
    set_state(engine, model, lost_id, JobStates.LOST)
    mq.fail_lost_job(lost_id, {"reason": "operator gave up"})
    dbsession.commit()
    stored = fetch_job(engine, model, lost_id)
    assert (stored.state, stored.result) == (JobStates.FAILED, {"reason": "operator gave up"})


@pytest.mark.parametrize(
    "state", [JobStates.PENDING, JobStates.RUNNING, JobStates.COMPLETED, JobStates.FAILED, JobStates.CANCELED]
)
def test_fail_lost_job_rejects_other_states(engine, model, dbsession, mq, state):
    (job_id,) = enqueue(engine, model, ("q", "m", {}))
    set_state(engine, model, job_id, state)
    with pytest.raises(InvalidJobStateError):
        mq.fail_lost_job(job_id)
    dbsession.rollback()
    assert fetch_job(engine, model, job_id).state == state
    with pytest.raises(JobNotFoundError):
        mq.fail_lost_job(10**12)


# -- on_finish ------------------------------------------------------------------------------------------

ON_FINISH = {"queue": "callbacks", "method": "done", "args": {"x": 1}, "cursor_key": "cb"}


def callback_jobs(engine: sa.Engine, model: Any) -> list[Any]:
    with Session(engine) as session:
        jobs = list(session.scalars(sa.select(model.Job).where(model.Job.queue == "callbacks")))
        session.expunge_all()
        return jobs


@pytest.mark.parametrize("outcome", ["completed", "failed", "failed_job_error"])
def test_on_finish_runs_when_a_worker_finishes_the_job(engine, model, outcome):
    def behaviour(job: Any) -> Any:
        if job.method == "failed":
            raise RuntimeError("boom")
        if job.method == "failed_job_error":
            raise FailedJobError({"why": "no"})
        return "ok"

    with running_worker(engine, model, {"q": RecordingQueue(behaviour)}):
        (job_id,) = enqueue(engine, model, ("q", outcome, {}), on_finish=ON_FINISH)
        wait_until(lambda: fetch_job(engine, model, job_id).state in JobStates.FINISHED)
    expected_state = JobStates.COMPLETED if outcome == "completed" else JobStates.FAILED
    assert fetch_job(engine, model, job_id).state == expected_state
    (callback,) = callback_jobs(engine, model)
    assert (callback.method, callback.args, callback.cursor_key, callback.state) == (
        "done",
        {"x": 1, "finished_jobs": [job_id]},
        "cb",
        JobStates.PENDING,
    )
    assert callback.trace == {"on_finish_of": job_id}


def test_on_finish_on_cancel_is_in_the_same_transaction(engine, model, dbsession, mq):
    job = mq.call("q", "m", {}, on_finish=ON_FINISH)
    dbsession.commit()
    assert mq.cancel_job(job.id) is True
    assert count_jobs(dbsession, model, queue="callbacks") == 1
    assert callback_jobs(engine, model) == []  # not committed yet
    dbsession.rollback()
    assert callback_jobs(engine, model) == []
    assert mq.cancel_job(job.id) is True
    dbsession.commit()
    assert len(callback_jobs(engine, model)) == 1


def test_on_finish_not_when_lost_but_when_lost_job_is_failed(engine, model, dbsession, mq):
    (job_id,) = enqueue(engine, model, ("q", "m", {}), on_finish=ON_FINISH)
    set_state(engine, model, job_id, JobStates.RUNNING, attempts=1)
    set_state(engine, model, job_id, JobStates.LOST)
    assert callback_jobs(engine, model) == []
    mq.fail_lost_job(job_id)
    dbsession.commit()
    assert [c.trace for c in callback_jobs(engine, model)] == [{"on_finish_of": job_id}]


def test_retry_of_lost_job_moves_on_finish_to_the_new_job(engine, model, dbsession, mq):
    (job_id,) = enqueue(engine, model, ("q", "m", {}), on_finish=ON_FINISH)
    set_state(engine, model, job_id, JobStates.LOST)
    new = mq.retry_job(job_id)
    dbsession.commit()
    assert callback_jobs(engine, model) == []  # failing the lost job did not call back
    assert fetch_job(engine, model, new.id).on_finish == ON_FINISH
    assert mq.cancel_job(new.id) is True
    dbsession.commit()
    assert [c.trace for c in callback_jobs(engine, model)] == [{"on_finish_of": new.id}]


def test_on_finish_callbacks_collapse_on_their_cursor(engine, model):
    """Two jobs finishing while the first callback is still pending make one callback job."""
    with running_worker(engine, model, {"q": RecordingQueue()}, threads=2):
        ids = enqueue(engine, model, ("q", "a", {}), ("q", "b", {}), on_finish=ON_FINISH)
        wait_until(lambda: all(fetch_job(engine, model, i).state == JobStates.COMPLETED for i in ids))
    (callback,) = callback_jobs(engine, model)
    assert callback.state == JobStates.PENDING
    assert callback.trace["on_finish_of"] in ids
    assert callback.args == {"x": 1, "finished_jobs": [callback.trace["on_finish_of"]]}
    # the callback learns every job it stands for, once
    with Session(engine) as session, session.begin():
        taken = MQSource(dbsession=session, model=model).take_finished_jobs(ON_FINISH["cursor_key"])
    assert taken == sorted(ids)
    with Session(engine) as session, session.begin():
        assert MQSource(dbsession=session, model=model).take_finished_jobs(ON_FINISH["cursor_key"]) == []


def test_on_finish_callbacks_collapse_on_cancel(engine, model, dbsession, mq):
    a = mq.call("q", "a", {}, on_finish=ON_FINISH)
    b = mq.call("q", "b", {}, on_finish=ON_FINISH)
    dbsession.commit()
    assert mq.cancel_job(a.id) and mq.cancel_job(b.id)
    dbsession.commit()
    (callback,) = callback_jobs(engine, model)
    assert callback.args == {"x": 1, "finished_jobs": [a.id]}
    assert mq.take_finished_jobs(ON_FINISH["cursor_key"]) == [a.id, b.id]
    dbsession.rollback()  # taking them is part of the caller's transaction
    assert mq.take_finished_jobs(ON_FINISH["cursor_key"]) == [a.id, b.id]
