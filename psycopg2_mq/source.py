"""``MQSource``: the client API to queue jobs and look after them.

It works inside the caller's SQLAlchemy session and never commits: a job, and
the NOTIFY that wakes workers for it, become visible when the caller commits.
"""

from __future__ import annotations

import dataclasses
import json
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, make_transient_to_detached
from sqlalchemy.orm.attributes import flag_modified, instance_state

from . import _json
from ._notify import channel_for
from ._queries import _table_sql
from .errors import InvalidJobStateError, JobNotFoundError
from .model import JobStates, Model
from .policy import MAX_SECONDS, Backoff, check_policy_values


@dataclass
class CallRequest:
    """A call as requested, handed to a ``conflict_resolver``."""

    queue: str
    method: str
    args: Any
    when: datetime | timedelta | None = None
    cursor_key: str | None = None
    trace: Any = None
    on_finish: dict[str, Any] | None = None
    collapse_on_cursor: bool = True
    max_attempts: int | None = None
    backoff: Backoff | None = None
    lost_policy: str | None = None
    timeout: float | timedelta | None = None


ConflictResolver = Callable[[Any, CallRequest], None]


class MQSource:
    """Queue and manage jobs within the caller's transaction.

    ``dbsession`` is a SQLAlchemy ``Session``; ``model`` comes from
    ``make_default_model``. No method commits.
    """

    def __init__(self, *, dbsession: Session, model: Model) -> None:
        self.dbsession = dbsession
        self.model = model

    # -- queueing -------------------------------------------------------------

    def call(
        self,
        queue: str,
        method: str,
        args: Any,
        *,
        when: datetime | timedelta | None = None,
        cursor_key: str | None = None,
        collapse_on_cursor: bool = True,
        conflict_resolver: ConflictResolver | None = None,
        trace: Any = None,
        on_finish: dict[str, Any] | None = None,
        max_attempts: int | None = None,
        backoff: Backoff | None = None,
        lost_policy: str | None = None,
        timeout: float | timedelta | None = None,
    ) -> Any:
        """Queue ``queue.method(args)`` and return the job (a ``model.Job``).

        ``when``: not before this time (aware datetime; naive means UTC) or
        this long from now (``timedelta``), on the database clock.
        ``cursor_key``: serialize with the other jobs of this key and share
        ``job.cursor``. While a collapsible job is pending on the cursor, the
        call returns that job and queues nothing (``collapse_on_cursor=False``
        queues a new job that waits its turn). ``conflict_resolver(pending_job,
        request)`` may then update the pending job (it is locked meanwhile).
        ``on_finish``: a call ``{queue, method, args, cursor_key}`` queued in the
        transaction that makes this job completed, failed or canceled; its
        ``args['finished_jobs']`` holds the id of the job that queued it. With a
        cursor_key such calls collapse, and every finished job is recorded for
        :meth:`take_finished_jobs`.
        ``max_attempts``, ``backoff``, ``lost_policy`` and ``timeout`` (seconds)
        override the queue's ``policy`` for this job (see ``policy.py``).
        """
        request = CallRequest(
            queue=queue,
            method=method,
            args=args,
            when=when,
            cursor_key=cursor_key,
            trace=trace,
            on_finish=on_finish,
            collapse_on_cursor=collapse_on_cursor,
            max_attempts=max_attempts,
            backoff=backoff,
            lost_policy=lost_policy,
            timeout=timeout,
        )
        params = _insert_params(request)
        if conflict_resolver is not None and (cursor_key is None or not collapse_on_cursor):
            raise ValueError("conflict_resolver needs a cursor_key and collapse_on_cursor=True")
        insert = _insert_statement(self.model, collapsing=cursor_key is not None and collapse_on_cursor)
        session = self.dbsession
        # A collapse target can be claimed between our INSERT and SELECT; then
        # the cursor has no pending job any more and inserting again succeeds.
        for _ in range(10):
            if session.autoflush:
                # as Session.execute would: pending ORM changes go first
                session.flush()
            row = self._connection().exec_driver_sql(insert.sql, params).first()
            if row is not None:
                return insert.attach(session, row, params)
            existing = self._pending_on_cursor(cursor_key, lock=conflict_resolver is not None)
            if existing is not None:
                if conflict_resolver is not None:
                    conflict_resolver(existing, request)
                    # JSON columns don't track changes made in place
                    flag_modified(existing, "args")
                    flag_modified(existing, "trace")
                    self.dbsession.flush()
                    # its time may have moved; workers re-read the next due job
                    self._notify(existing.queue)
                return existing
        raise RuntimeError(f"could not queue on cursor {cursor_key!r}: it kept changing under us")

    def call_many(self, calls: Iterable[Sequence[Any] | dict[str, Any]]) -> list[int]:
        """Queue many calls in one statement; return their job ids, in order.

        Each call is a ``(queue, method, args)`` tuple or a dict with the
        keyword arguments of :meth:`call` (no ``conflict_resolver``). Cursor rules
        hold as for :meth:`call`, within the batch too: a collapsed call gets
        the id of the pending job it collapsed onto. All calls are validated
        before anything is written.
        """
        requests: list[CallRequest] = []
        checked: list[
            tuple[str, str | None, str | None, datetime | timedelta | None, dict[str, Any] | None]
        ] = []
        for entry in calls:
            if isinstance(entry, dict):
                if "conflict_resolver" in entry:
                    raise ValueError("call_many does not take a conflict_resolver")
                request = CallRequest(**entry)
            else:
                request = CallRequest(*entry)
            args, trace, on_finish, when = _check(request)
            checked.append((args, trace, on_finish, when, _policy_or_none(request)))
            requests.append(request)
        if not requests:
            return []
        if all(r.cursor_key is None for r in requests):
            # the common bulk case: nothing can collapse, so a plain insert will do
            return self._insert_plain(requests, checked)
        items = [_bulk_item(r, *c) for r, c in zip(requests, checked, strict=True)]
        rows = (
            self._connection()
            .exec_driver_sql(_bulk_insert_sql(self.model), {"items": "[" + ",".join(items) + "]"})
            .all()
        )
        ids: list[int] = []
        for ordinal, job_id in rows:
            if job_id is None:
                # the job it collapsed onto was claimed meanwhile: queue it on its own
                request = requests[ordinal - 1]
                # shallow: asdict() would turn a Backoff into a dict
                job = self.call(**{f.name: getattr(request, f.name) for f in dataclasses.fields(request)})
                job_id = job.id
            ids.append(job_id)
        return ids

    def _insert_plain(self, requests: list[CallRequest], checked: list[Any]) -> list[int]:
        """``call_many`` for calls without a cursor: one INSERT from column arrays."""
        n = len(requests)
        columns: dict[str, list[Any]] = {
            "queue": [r.queue for r in requests],
            "method": [r.method for r in requests],
            "args": [c[0] for c in checked],
        }
        # a column left empty unnests as NULLs: no need to send 1,000 of them
        optional: dict[str, list[Any]] = {name: [] for name in _PLAIN_OPTIONAL}
        for i, (_, trace, on_finish, when, policy) in enumerate(checked):
            if trace is not None:
                _set(optional["trace"], n, i, trace)
            if on_finish is not None:
                _set(optional["on_finish"], n, i, on_finish)
            if isinstance(when, timedelta):
                _set(optional["delay"], n, i, when.total_seconds())
            elif when is not None:
                _set(optional["at"], n, i, when)
            if policy is not None:
                for name in ("max_attempts", "lost_policy", "timeout"):
                    if policy[name] is not None:
                        _set(optional[name], n, i, policy[name])
                if policy["backoff"] is not None:
                    _set(optional["backoff"], n, i, json.dumps(policy["backoff"]))
        columns.update(optional)
        params = {name: _array_literal(values) for name, values in columns.items()}
        rows = self._connection().exec_driver_sql(_plain_insert_sql(self.model), params).all()
        return [row[0] for row in rows]

    # -- inspecting -----------------------------------------------------------

    def get_job(self, job_id: int) -> Any:
        """The ``model.Job`` with this id, or ``None``."""
        return self.dbsession.get(self.model.Job, job_id)

    def find_jobs(
        self,
        *,
        queue: str | None = None,
        method: str | None = None,
        state: str | Iterable[str] | None = None,
        cursor_key: str | None = None,
        limit: int | None = 100,
    ) -> list[Any]:
        """Jobs matching all the given filters, newest first."""
        Job = self.model.Job
        query = sa.select(Job).order_by(Job.id.desc())
        if queue is not None:
            query = query.where(Job.queue == queue)
        if method is not None:
            query = query.where(Job.method == method)
        if state is not None:
            states = [state] if isinstance(state, str) else list(state)
            unknown = set(states) - set(JobStates.ALL)
            if unknown:
                raise ValueError(f"unknown job states: {sorted(unknown)}")
            query = query.where(Job.state.in_(states))
        if cursor_key is not None:
            query = query.where(Job.cursor_key == cursor_key)
        if limit is not None:
            query = query.limit(limit)
        return list(self.dbsession.scalars(query))

    def get_cursor(self, cursor_key: str) -> dict[str, Any] | None:
        """The saved data of a cursor, or ``None`` if no job completed on it yet."""
        row = self.dbsession.get(self.model.JobCursor, cursor_key)
        return None if row is None else row.properties

    def blocked_cursors(
        self, *, running_longer_than: float | timedelta | None = None
    ) -> list[dict[str, Any]]:
        """Cursors held by a lost job, or by a job running longer than the given time.

        Each entry: ``cursor_key``, the holding ``job_id``, its ``state``,
        ``worker_id``, ``start_time``, ``held_seconds`` and how many jobs are
        ``waiting`` on the cursor.
        """
        seconds = (
            running_longer_than.total_seconds()
            if isinstance(running_longer_than, timedelta)
            else running_longer_than
        )
        job = _table_sql(self.model.job_table)
        rows = (
            self._connection()
            .exec_driver_sql(
                f"""
            SELECT h.cursor_key, h.id, h.state, h.worker_id, h.start_time,
                   EXTRACT(EPOCH FROM now() - h.start_time)::float8,
                   (SELECT count(*) FROM {job} AS p WHERE p.cursor_key = h.cursor_key AND p.state = 'pending')
            FROM {job} AS h
            WHERE h.cursor_key IS NOT NULL AND (h.state = 'lost' OR (
                h.state = 'running' AND %(secs)s::float8 IS NOT NULL
                AND h.start_time < now() - make_interval(secs => %(secs)s::float8)))
            ORDER BY h.start_time
            """,
                {"secs": seconds},
            )
            .all()
        )
        keys = ("cursor_key", "job_id", "state", "worker_id", "start_time", "held_seconds", "waiting")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def explain_job(self, job_id: int) -> dict[str, Any]:
        """Why a job is (not) running: ``{"job_id", "state", "reasons": [...]}``.

        For a pending job the reasons say what it waits for: its ``when``, its
        cursor (held by another job, or other jobs ahead of it), or a live
        worker serving its queue; ``"ready"`` when only a free worker thread is
        missing.
        """
        job = self._require(job_id)
        if job.state != JobStates.PENDING:
            return {"job_id": job.id, "state": job.state, "reasons": [f"the job is {job.state}, not pending"]}
        table, workers = _table_sql(self.model.job_table), _table_sql(self.model.worker_table)
        row = (
            self._connection()
            .exec_driver_sql(
                f"""
            SELECT EXTRACT(EPOCH FROM j.scheduled_time - now())::float8,
                   (SELECT array[h.id::text, h.state] FROM {table} AS h
                    WHERE h.cursor_key = j.cursor_key AND h.cursor_key IS NOT NULL AND h.state IN ('running', 'lost')),
                   (SELECT count(*) FROM {table} AS a
                    WHERE a.cursor_key = j.cursor_key AND a.state = 'pending' AND a.id <> j.id
                      AND (a.scheduled_time, a.id) < (j.scheduled_time, j.id)),
                   EXISTS (SELECT 1 FROM {workers} AS w, pg_locks AS l
                           WHERE w.queues ? j.queue AND l.locktype = 'advisory' AND l.granted
                             AND l.objsubid = 2 AND l.classid = %(lock_class)s::bigint::oid
                             AND l.objid = w.id::bigint::oid
                             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))
            FROM {table} AS j WHERE j.id = %(id)s
            """,
                {"id": job_id, "lock_class": self.model.lock_class},
            )
            .one()
        )
        due_in, holder, ahead, served = row
        reasons = []
        if due_in > 0:
            reasons.append(f"waiting for its time: due in {due_in:.1f}s")
        if holder is not None:
            reasons.append(f"its cursor {job.cursor_key!r} is held by job {holder[0]} ({holder[1]})")
        if ahead:
            reasons.append(f"{ahead} job(s) ahead of it on cursor {job.cursor_key!r}")
        if not served:
            reasons.append(f"no live worker serves queue {job.queue!r}")
        return {"job_id": job.id, "state": job.state, "reasons": reasons or ["ready"]}

    def take_finished_jobs(self, cursor_key: str) -> list[int]:
        """Ids of the jobs whose ``on_finish`` (with this ``cursor_key``) fired; deletes them.

        Meant for the callback itself: called in the callback's transaction, a
        crash before its commit leaves them for the next callback.
        """
        _check_name(cursor_key, "cursor_key")
        table = _table_sql(self.model.finished_job_table)
        rows = (
            self._connection()
            .exec_driver_sql(
                f"DELETE FROM {table} WHERE cursor_key = %(key)s RETURNING job_id", {"key": cursor_key}
            )
            .all()
        )
        return sorted(row[0] for row in rows)

    # -- managing -------------------------------------------------------------

    def cancel_job(self, job_id: int) -> bool:
        """Cancel a pending job; ``False`` if it already left ``pending``."""
        Job = self.model.Job
        canceled = self.dbsession.execute(
            sa.update(Job)
            .where(Job.id == job_id, Job.state == JobStates.PENDING)
            .values(state=JobStates.CANCELED, end_time=sa.func.now())
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        ).first()
        if canceled is None:
            self._require(job_id)
            return False
        self._expire(job_id)
        return True

    def retry_job(self, job_id: int) -> Any:
        """Queue a new job with the same call; return it.

        The job must be finished (completed, failed, canceled) or lost. A lost
        job is failed first, which frees its cursor; its ``on_finish`` call
        moves to the new job. The new job keeps the call's policy, never
        collapses onto another pending job (it queues behind it), and its trace
        records ``retry_of``.
        """
        job = self._require(job_id, lock=True)
        retryable = (*JobStates.FINISHED, JobStates.LOST)
        if job.state not in retryable:
            raise InvalidJobStateError(
                f"job {job_id} is {job.state}; only {', '.join(retryable)} jobs can be retried"
            )
        on_finish = job.on_finish
        if job.state == JobStates.LOST:
            self._finish_lost(job, _lost_error("retried"), keep_on_finish=False)
        trace = dict(job.trace) if isinstance(job.trace, dict) else {"original_trace": job.trace}
        trace["retry_of"] = job.id
        collapsible = job.collapsible
        if job.cursor_key is not None and collapsible and self._pending_on_cursor(job.cursor_key, lock=False):
            # a retry is a job of its own: it never collapses onto another one,
            # it waits behind it (only one pending job per cursor may collapse)
            collapsible = False
        return self.call(
            job.queue,
            job.method,
            job.args,
            cursor_key=job.cursor_key,
            collapse_on_cursor=collapsible if job.cursor_key else True,
            trace=trace,
            on_finish=on_finish,
            # RetryJob snoozes raised max_attempts; the retry starts afresh
            max_attempts=None if job.max_attempts is None else job.max_attempts - _snoozes(job.errors),
            backoff=None if job.backoff is None else Backoff.from_json(job.backoff),
            lost_policy=job.lost_policy,
            timeout=job.timeout,
        )

    def fail_lost_job(self, job_id: int, result: Any = None) -> Any:
        """Fail a lost job, freeing its cursor; return it."""
        job = self._require(job_id, lock=True)
        if job.state != JobStates.LOST:
            raise InvalidJobStateError(f"job {job_id} is {job.state}, not lost")
        self._finish_lost(job, _lost_error("failed by fail_lost_job") if result is None else result)
        return job

    # -- internals ------------------------------------------------------------

    def _finish_lost(self, job: Any, result: Any, keep_on_finish: bool = True) -> None:
        _json.dumps(result, "result")
        job.state = JobStates.FAILED
        job.result = result
        if not keep_on_finish:
            job.on_finish = None
        self.dbsession.flush()
        if job.cursor_key is not None:
            # the cursor is free now: wake the workers of the job waiting on it
            Job = self.model.Job
            waiting = self.dbsession.scalars(
                sa.select(Job.queue)
                .where(Job.cursor_key == job.cursor_key, Job.state == JobStates.PENDING)
                .distinct()
            )
            for queue in waiting:
                self._notify(queue)

    def _pending_on_cursor(self, cursor_key: str | None, lock: bool) -> Any:
        Job = self.model.Job
        query = sa.select(Job).where(
            Job.cursor_key == cursor_key, Job.state == JobStates.PENDING, Job.collapsible.is_(True)
        )
        if lock:
            query = query.with_for_update()
        return self.dbsession.scalars(query.execution_options(populate_existing=True)).one_or_none()

    def _require(self, job_id: int, lock: bool = False) -> Any:
        job = self.dbsession.get(self.model.Job, job_id, with_for_update=lock or None, populate_existing=True)
        if job is None:
            raise JobNotFoundError(f"no job with id {job_id}")
        return job

    def _expire(self, job_id: int) -> None:
        job = self.dbsession.identity_map.get(
            sa.inspect(self.model.Job).identity_key_from_primary_key((job_id,))
        )
        if job is not None:
            self.dbsession.expire(job)

    def _notify(self, queue: str) -> None:
        self.dbsession.execute(sa.select(sa.func.pg_notify(channel_for(queue), "")))

    def _connection(self) -> sa.Connection:
        return self.dbsession.connection()


# -- validation -------------------------------------------------------------------


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    if "\x00" in value:
        raise ValueError(f"{what} must not contain a NUL character")
    return value


def _check_when(when: Any) -> datetime | timedelta | None:
    if isinstance(when, timedelta):
        if abs(when.total_seconds()) > MAX_SECONDS:
            raise ValueError(f"when is too far away: at most {MAX_SECONDS:g} seconds from now")
        return when
    if when is None:
        return when
    if isinstance(when, datetime):
        return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)
    raise TypeError(f"when must be a datetime, a timedelta or None, got {type(when).__name__}")


def _check_on_finish(on_finish: Any) -> dict[str, Any] | None:
    if on_finish is None:
        return None
    if not isinstance(on_finish, dict):
        raise TypeError("on_finish must be a dict {queue, method, args, cursor_key}")
    unknown = set(on_finish) - {"queue", "method", "args", "cursor_key"}
    if unknown:
        raise ValueError(f"on_finish has unknown keys: {sorted(unknown)}")
    _check_name(on_finish.get("queue"), "on_finish queue")
    _check_name(on_finish.get("method"), "on_finish method")
    if on_finish.get("cursor_key") is not None:
        _check_name(on_finish["cursor_key"], "on_finish cursor_key")
    if not isinstance(on_finish.get("args", {}), dict):
        raise TypeError("on_finish args must be a dict (the callback gets args['finished_jobs'] added)")
    _json.dumps(on_finish.get("args", {}), "on_finish args")
    return on_finish


def _policy_values(request: CallRequest) -> dict[str, Any]:
    """The call's own policy columns (None: the queue's policy applies)."""
    timeout = request.timeout.total_seconds() if isinstance(request.timeout, timedelta) else request.timeout
    check_policy_values(request.max_attempts, request.lost_policy, timeout)
    if request.backoff is not None and not isinstance(request.backoff, Backoff):
        raise TypeError(
            "backoff must be a psycopg2_mq.Backoff (a custom function belongs in the queue's policy)"
        )
    return {
        "max_attempts": request.max_attempts,
        "backoff": None if request.backoff is None else request.backoff.to_json(),
        "lost_policy": request.lost_policy,
        "timeout": timeout,
    }


def _policy_or_none(request: CallRequest) -> dict[str, Any] | None:
    """``_policy_values``, or None when the call sets no policy (the common case)."""
    if (
        request.max_attempts is None
        and request.backoff is None
        and request.lost_policy is None
        and request.timeout is None
    ):
        return None
    return _policy_values(request)


def _check(request: CallRequest) -> tuple[str, str | None, str | None, datetime | timedelta | None]:
    """Validate a call; returns (args json, trace json, on_finish json, when); None: SQL NULL."""
    _check_name(request.queue, "queue")
    _check_name(request.method, "method")
    if request.cursor_key is not None:
        _check_name(request.cursor_key, "cursor_key")
    elif request.collapse_on_cursor is not True:
        raise ValueError("collapse_on_cursor only applies to calls with a cursor_key")
    if not isinstance(request.collapse_on_cursor, bool):
        raise TypeError("collapse_on_cursor must be a bool")
    args = _json.dumps(request.args, "args")
    trace = None if request.trace is None else _json.dumps(request.trace, "trace")
    on_finish = _check_on_finish(request.on_finish)
    when = _check_when(request.when)
    return args, trace, None if on_finish is None else _json.dumps(on_finish, "on_finish"), when


def _insert_params(request: CallRequest) -> dict[str, Any]:
    """Validated parameters of ``_insert_statement`` (JSON as text, None as SQL NULL)."""
    args, trace, on_finish, when = _check(request)
    policy = _policy_values(request)
    return {
        "queue": request.queue,
        "method": request.method,
        "args": args,
        "cursor_key": request.cursor_key,
        "collapsible": request.collapse_on_cursor,
        "trace": trace,
        "on_finish": on_finish,
        "max_attempts": policy["max_attempts"],
        "backoff": None if policy["backoff"] is None else json.dumps(policy["backoff"]),
        "lost_policy": policy["lost_policy"],
        "timeout": policy["timeout"],
        "at": when if isinstance(when, datetime) else None,
        "delay": when.total_seconds() if isinstance(when, timedelta) else None,
    }


#: the columns ``call``'s INSERT returns: what the server computes, and the JSON
#: columns as jsonb normalized them (a fresh load of the job reads the same)
_RETURNED = ("id", "created_time", "scheduled_time", "args", "trace", "on_finish", "backoff")


@dataclass(frozen=True)
class _Insert:
    """``call``'s one-round-trip INSERT .. RETURNING for one model, and how to make its ``model.Job``."""

    sql: str
    mapper: Any

    def attach(self, session: Session, row: Sequence[Any], params: dict[str, Any]) -> Any:
        """The inserted job as a persistent ``model.Job`` of ``session``, without a reload.

        Loading the row through the ORM (``select(Job).from_statement``) cost
        about as much Python as the round trip; the job is built from the
        returned server values and the validated parameters instead, then
        attached as a clean persistent object (identity map included). A
        column neither returned nor filled here would load on first access.
        """
        job = self.mapper.class_manager.new_instance()
        values = dict(zip(_RETURNED, row, strict=True))
        timeout = params["timeout"]
        values.update(
            queue=params["queue"],
            method=params["method"],
            result=None,
            state=JobStates.PENDING,
            cursor_key=params["cursor_key"],
            collapsible=params["collapsible"],
            start_time=None,
            end_time=None,
            worker_id=None,
            attempts=0,
            max_attempts=params["max_attempts"],
            lost_policy=params["lost_policy"],
            # a float8 column: an int timeout reads back as a float
            timeout=None if timeout is None else float(timeout),
            deadline=None,
            errors=None,
        )
        # straight into the instance dict: no attribute events, nothing to flush
        instance_state(job).dict.update(values)
        make_transient_to_detached(job)
        session.add(job)
        return job


#: per mapped Job class (weakly: a model that goes away takes its statements along)
_insert_statements: weakref.WeakKeyDictionary[type, dict[bool, _Insert]] = weakref.WeakKeyDictionary()


def _insert_statement(model: Model, collapsing: bool) -> _Insert:
    """The one-round-trip INSERT .. RETURNING of ``call``.

    Built once per model and run at driver level (``exec_driver_sql``: engine
    events still fire): building a Core insert per call cost more than the
    round trip, and an ORM load of ``RETURNING *`` about as much again.
    ``scheduled_time`` is on the database clock.
    """
    statements = _insert_statements.setdefault(model.Job, {})
    insert = statements.get(collapsing)
    if insert is None:
        mapper = sa.inspect(model.Job)
        # new_instance() skips the mapper's own configure step
        sa.orm.configure_mappers()
        conflict = (
            "ON CONFLICT (cursor_key) WHERE state = 'pending' AND collapsible AND cursor_key IS NOT NULL DO NOTHING"
            if collapsing
            else ""
        )
        sql = f"""
            INSERT INTO {_table_sql(model.job_table)} (queue, method, args, state, cursor_key, collapsible, trace,
                on_finish, max_attempts, backoff, lost_policy, timeout, scheduled_time)
            VALUES (%(queue)s, %(method)s, %(args)s::jsonb, 'pending', %(cursor_key)s, %(collapsible)s,
                    %(trace)s::jsonb, %(on_finish)s::jsonb, %(max_attempts)s, %(backoff)s::jsonb,
                    %(lost_policy)s, %(timeout)s,
                    coalesce(%(at)s::timestamptz, now() + make_interval(secs => %(delay)s::float8), now()))
            {conflict}
            RETURNING {", ".join(_RETURNED)}
            """
        insert = statements[collapsing] = _Insert(sql=sql, mapper=mapper)
    return insert


def _bulk_item(
    request: CallRequest,
    args: str,
    trace: str | None,
    on_finish: str | None,
    when: datetime | timedelta | None,
    policy: dict[str, Any] | None,
) -> str:
    """One checked call as a JSON object for the cursor-aware bulk insert (JSON spliced in as-is)."""
    fields = {
        "queue": request.queue,
        "method": request.method,
        "cursor_key": request.cursor_key,
        "collapsible": request.collapse_on_cursor,
        **(policy or {}),
    }
    if isinstance(when, timedelta):
        fields["delay"] = when.total_seconds()
    elif when is not None:
        fields["at"] = when.isoformat()
    head = json.dumps(fields)[:-1]
    tail = f',"args":{args}'
    if trace is not None:
        tail += f',"trace":{trace}'
    if on_finish is not None:
        tail += f',"on_finish":{on_finish}'
    return head + tail + "}"


def _array_literal(values: list[Any]) -> str:
    """A PostgreSQL array literal (``{"a",NULL,"b"}``) of str, number or datetime values.

    Sent as one text parameter, it is parsed by the server's array input in
    one go: a Python list becomes ``ARRAY['a', NULL, 'b']``, an expression of
    one constant per element that took twice as long to send and plan.
    """
    items = []
    for value in values:
        if value is None:
            items.append("NULL")
            continue
        text = value.isoformat() if isinstance(value, datetime) else str(value)
        items.append('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')
    return "{" + ",".join(items) + "}"


def _set(column: list[Any], n: int, i: int, value: Any) -> None:
    """Set item ``i`` of a column of ``n`` values that starts out empty (all NULL)."""
    if not column:
        column.extend([None] * n)
    column[i] = value


#: the columns of ``_plain_insert_sql`` sent only when some call sets them
_PLAIN_OPTIONAL = ("trace", "on_finish", "max_attempts", "backoff", "lost_policy", "timeout", "at", "delay")


def _plain_insert_sql(model: Model) -> str:
    job = _table_sql(model.job_table)
    # One array per column (unnest pads an empty one with NULLs). Ids are drawn
    # in the CTE, so each input position knows its id whatever order the
    # INSERT writes or returns rows in; the final SELECT orders them.
    return f"""
WITH v AS MATERIALIZED (
    SELECT nextval((SELECT pg_get_serial_sequence('{job}', 'id'))::regclass) AS id, u.*
    FROM unnest(%(queue)s::text[], %(method)s::text[], %(args)s::jsonb[], %(trace)s::jsonb[],
                %(on_finish)s::jsonb[], %(max_attempts)s::int[], %(backoff)s::jsonb[], %(lost_policy)s::text[],
                %(timeout)s::float8[], %(at)s::timestamptz[], %(delay)s::float8[])
         WITH ORDINALITY AS u(queue, method, args, trace, on_finish, max_attempts, backoff, lost_policy, timeout,
                              at, delay, ord)
),
ins AS (
    INSERT INTO {job} (id, queue, method, args, state, collapsible, trace, on_finish, scheduled_time,
                       max_attempts, backoff, lost_policy, timeout)
    SELECT id, queue, method, args, 'pending', true, trace, on_finish,
           coalesce(at, now() + make_interval(secs => delay), now()),
           max_attempts, backoff, lost_policy, timeout
    FROM v ORDER BY ord
)
SELECT id FROM v ORDER BY ord
"""


def _snoozes(errors: Any) -> int:
    """How many attempts ended in RetryJob (each raised max_attempts by one)."""
    return sum(1 for e in errors or [] if isinstance(e, dict) and e.get("type") == "RetryJob")


def _lost_error(action: str) -> dict[str, Any]:
    return {"error": {"type": "LostJob", "message": f"the worker running this job died; {action}"}}


def _bulk_insert_sql(model: Model) -> str:
    job = _table_sql(model.job_table)
    # Ids are drawn up front (nextval per item) so that every item can be told
    # whether it was inserted or collapsed, and onto which job: a later item on
    # the same cursor collapses onto an earlier one of the batch, or onto the
    # job already pending (NULL if that one was claimed meanwhile).
    return f"""
WITH v AS MATERIALIZED (
    SELECT e.ord, e.item->>'queue' AS queue, e.item->>'method' AS method, e.item->'args' AS args,
           e.item->>'cursor_key' AS cursor_key, (e.item->>'collapsible')::boolean AS collapsible,
           e.item->'trace' AS trace, e.item->'on_finish' AS on_finish,
           (e.item->>'max_attempts')::int AS max_attempts, nullif(e.item->'backoff', 'null') AS backoff,
           e.item->>'lost_policy' AS lost_policy, (e.item->>'timeout')::float8 AS timeout,
           CASE WHEN e.item ? 'at' THEN (e.item->>'at')::timestamptz
                WHEN e.item ? 'delay' THEN now() + make_interval(secs => (e.item->>'delay')::float8)
                ELSE now() END AS scheduled_time,
           nextval(pg_get_serial_sequence('{job}', 'id')) AS new_id
    FROM jsonb_array_elements(%(items)s::jsonb) WITH ORDINALITY AS e(item, ord)
),
ins AS (
    INSERT INTO {job} (id, queue, method, args, state, cursor_key, collapsible, trace, on_finish, scheduled_time,
                       max_attempts, backoff, lost_policy, timeout)
    SELECT new_id, queue, method, args, 'pending', cursor_key, collapsible, trace, on_finish, scheduled_time,
           max_attempts, backoff, lost_policy, timeout
    FROM v ORDER BY ord
    ON CONFLICT (cursor_key) WHERE state = 'pending' AND collapsible AND cursor_key IS NOT NULL DO NOTHING
    RETURNING id
)
SELECT v.ord, coalesce(
    ins.id,
    (SELECT min(i2.id) FROM ins AS i2 JOIN v AS v2 ON v2.new_id = i2.id
     WHERE v2.cursor_key = v.cursor_key AND v2.collapsible),
    (SELECT p.id FROM {job} AS p
     WHERE p.cursor_key = v.cursor_key AND p.state = 'pending' AND p.collapsible))
FROM v LEFT JOIN ins ON ins.id = v.new_id
ORDER BY v.ord
"""
