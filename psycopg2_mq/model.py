"""The tables: jobs, cursors and the worker registry used for liveness.

``make_default_model(metadata)`` declares them on the caller's ``MetaData`` and
returns a :class:`Model` holding the mapped classes, so that an application can
put the queue next to its own tables and query them with its own sessions.

Every name is fixed (``conv``): an application's naming convention on its
``MetaData`` does not rename them, so the alembic history matches.

The indexes are the part that matters most:

* ``ix_mq_job_claim`` covers only *pending* jobs, so the claim query stays
  cheap however many finished jobs pile up in the table.
* ``uq_mq_job_pending_cursor`` makes "at most one pending collapsible job per
  cursor" a database rule; ``MQSource.call`` collapses onto it with
  ``INSERT .. ON CONFLICT DO NOTHING``.
* ``uq_mq_job_active_cursor`` makes "at most one running-or-lost job per
  cursor" a database rule: two workers can never run the same cursor at once,
  even if the application code had a bug.

Both unique indexes hold only rows with a cursor key: jobs without one (most
of them) skip an index insert at every enqueue and claim.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, registry
from sqlalchemy.sql.elements import conv


class JobStates:
    """The states of a job; see ``docs/architecture.md`` for the state machine."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    LOST = "lost"

    ALL = (PENDING, RUNNING, COMPLETED, FAILED, CANCELED, LOST)
    #: states a job never leaves
    FINISHED = (COMPLETED, FAILED, CANCELED)
    #: states that hold a job's cursor
    HOLDING_CURSOR = (RUNNING, LOST)


@dataclass(frozen=True)
class Model:
    """The mapped classes and table names of one queue installation."""

    metadata: sa.MetaData
    Job: type
    JobCursor: type
    FinishedJob: type
    Worker: type
    states: type[JobStates]
    #: first key of the advisory locks that workers hold while alive
    lock_class: int

    @property
    def job_table(self) -> sa.Table:
        return self.Job.__table__  # type: ignore[attr-defined, no-any-return]

    @property
    def cursor_table(self) -> sa.Table:
        return self.JobCursor.__table__  # type: ignore[attr-defined, no-any-return]

    @property
    def finished_job_table(self) -> sa.Table:
        return self.FinishedJob.__table__  # type: ignore[attr-defined, no-any-return]

    @property
    def worker_table(self) -> sa.Table:
        return self.Worker.__table__  # type: ignore[attr-defined, no-any-return]


def _sql_list(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def _qualified(metadata: sa.MetaData, name: str) -> str:
    return f"{metadata.schema}.{name}" if metadata.schema else name


def make_default_model(metadata: sa.MetaData) -> Model:
    """Declare the queue's tables on ``metadata`` and return the :class:`Model`.

    Call it once per ``MetaData``; the tables are ``mq_job``, ``mq_cursor``,
    ``mq_worker`` and ``mq_finished_job`` (in ``metadata.schema`` if it has one).
    """
    reg = registry(metadata=metadata)

    class Base(DeclarativeBase):
        registry = reg

    states = _sql_list(JobStates.ALL)
    holding = _sql_list(JobStates.HOLDING_CURSOR)
    finished = _sql_list(JobStates.FINISHED)

    class Job(Base):
        """One call of ``queue.method(args)``; see ``JobStates``.

        Optional JSON columns store a Python ``None`` as SQL NULL
        (``none_as_null``); ``args`` and ``result`` keep JSON ``null`` as a value.
        """

        __tablename__ = "mq_job"

        id: Mapped[int] = mapped_column(sa.BigInteger, sa.Identity(), primary_key=True)
        queue: Mapped[str] = mapped_column(sa.Text)
        method: Mapped[str] = mapped_column(sa.Text)
        args: Mapped[Any] = mapped_column(JSONB)
        result: Mapped[Any | None] = mapped_column(JSONB)
        state: Mapped[str] = mapped_column(sa.Text)
        cursor_key: Mapped[str | None] = mapped_column(sa.Text)
        #: a pending collapsible job absorbs later calls on its cursor
        collapsible: Mapped[bool] = mapped_column(sa.Boolean, server_default=sa.true())
        #: free-form provenance (who asked, retry_of, workflow step...)
        trace: Mapped[Any | None] = mapped_column(JSONB(none_as_null=True))
        #: a call ({queue, method, args, cursor_key}) enqueued, in the same
        #: transaction, when this job becomes completed, failed or canceled
        on_finish: Mapped[Any | None] = mapped_column(JSONB(none_as_null=True))
        created_time: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now())
        #: the job is not started before this time (``when``)
        scheduled_time: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now())
        start_time: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))
        end_time: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))
        #: the worker (``mq_worker.id``) that claimed it last
        worker_id: Mapped[int | None] = mapped_column(sa.Integer)
        #: number of claims; also the fencing token a worker must present to finish it
        attempts: Mapped[int] = mapped_column(sa.Integer, server_default=sa.text("0"))
        #: retry policy asked for by the call; NULL takes the queue's (fixed at claim)
        max_attempts: Mapped[int | None] = mapped_column(sa.Integer)
        backoff: Mapped[Any | None] = mapped_column(JSONB(none_as_null=True))
        lost_policy: Mapped[str | None] = mapped_column(sa.Text)
        timeout: Mapped[float | None] = mapped_column(sa.Float)
        #: when a running attempt times out (claim time + timeout)
        deadline: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))
        #: the errors of earlier attempts that were retried, oldest first
        errors: Mapped[Any | None] = mapped_column(JSONB(none_as_null=True))

        __table_args__ = (
            sa.CheckConstraint(f"state IN ({states})", name=conv("ck_mq_job_state")),
            sa.CheckConstraint("queue <> '' AND method <> ''", name=conv("ck_mq_job_names")),
            sa.CheckConstraint("lost_policy IN ('hold', 'retry', 'fail')", name=conv("ck_mq_job_lost_policy")),
            sa.CheckConstraint("max_attempts >= 1", name=conv("ck_mq_job_max_attempts")),
            sa.CheckConstraint("timeout > 0", name=conv("ck_mq_job_timeout")),
            # the on_finish trigger runs inside the statement that finishes the
            # job: a malformed callback must be refused when it is written
            sa.CheckConstraint(
                "on_finish IS NULL OR (jsonb_typeof(on_finish) = 'object'"
                " AND coalesce(on_finish->>'queue', '') <> '' AND coalesce(on_finish->>'method', '') <> ''"
                " AND coalesce(jsonb_typeof(on_finish->'args'), 'object') = 'object')",
                name=conv("ck_mq_job_on_finish"),
            ),
            sa.PrimaryKeyConstraint("id", name=conv("mq_job_pkey")),
            sa.Index(
                conv("ix_mq_job_claim"),
                "queue",
                "scheduled_time",
                "id",
                postgresql_where=sa.text("state = 'pending'"),
            ),
            sa.Index(
                conv("uq_mq_job_pending_cursor"),
                "cursor_key",
                unique=True,
                postgresql_where=sa.text("state = 'pending' AND collapsible AND cursor_key IS NOT NULL"),
            ),
            sa.Index(
                conv("ix_mq_job_pending_cursor"),
                "cursor_key",
                "scheduled_time",
                "id",
                postgresql_where=sa.text("state = 'pending' AND cursor_key IS NOT NULL"),
            ),
            sa.Index(
                conv("uq_mq_job_active_cursor"),
                "cursor_key",
                unique=True,
                postgresql_where=sa.text(f"state IN ({holding}) AND cursor_key IS NOT NULL"),
            ),
            sa.Index(
                conv("ix_mq_job_finished"),
                "state",
                "end_time",
                postgresql_where=sa.text(f"state IN ({finished})"),
            ),
            sa.Index(
                conv("ix_mq_job_running_worker"),
                "worker_id",
                postgresql_where=sa.text("state = 'running'"),
            ),
        )

        def __repr__(self) -> str:
            return f"<Job id={self.id} {self.queue}.{self.method} state={self.state}>"

    class JobCursor(Base):
        """Persistent state shared by the jobs of one ``cursor_key``."""

        __tablename__ = "mq_cursor"
        __table_args__ = (sa.PrimaryKeyConstraint("key", name=conv("mq_cursor_pkey")),)

        key: Mapped[str] = mapped_column(sa.Text, primary_key=True)
        properties: Mapped[Any] = mapped_column(JSONB, server_default=sa.text("'{}'::jsonb"))
        updated_time: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now())

    class FinishedJob(Base):
        """A job whose ``on_finish`` callback has a cursor, recorded when it finished.

        Read and deleted by ``MQSource.take_finished_jobs(cursor_key)``, inside
        the callback's transaction: collapsed callbacks learn every job they
        stand for, without finishing jobs contending for one row.
        """

        __tablename__ = "mq_finished_job"
        __table_args__ = (sa.PrimaryKeyConstraint("cursor_key", "job_id", name=conv("mq_finished_job_pkey")),)

        cursor_key: Mapped[str] = mapped_column(sa.Text)
        job_id: Mapped[int] = mapped_column(sa.BigInteger)

    class Worker(Base):
        """A live (or recently dead) worker; it holds advisory lock ``(lock_class, id)``."""

        __tablename__ = "mq_worker"
        __table_args__ = (sa.PrimaryKeyConstraint("id", name=conv("mq_worker_pkey")),)

        id: Mapped[int] = mapped_column(sa.Integer, sa.Identity(), primary_key=True)
        name: Mapped[str] = mapped_column(sa.Text)
        host: Mapped[str] = mapped_column(sa.Text)
        pid: Mapped[int] = mapped_column(sa.Integer)
        queues: Mapped[Any] = mapped_column(JSONB)
        started_time: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now())
        #: when a maintenance pass first found this worker's lock free; its jobs
        #: are released once that has lasted ``lost_after`` (it may be reconnecting)
        missing_since: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))

    job_table = _qualified(metadata, "mq_job")
    _install_wake_trigger(Job.__table__, metadata.schema)
    lock_class = zlib.crc32(job_table.encode()) & 0x7FFFFFFF
    return Model(
        metadata=metadata,
        Job=Job,
        JobCursor=JobCursor,
        FinishedJob=FinishedJob,
        Worker=Worker,
        states=JobStates,
        lock_class=lock_class,
    )


def channel_sql(queue_expr: str) -> str:
    """SQL for the LISTEN/NOTIFY channel of a queue; mirrors ``notify.channel_for``."""
    return f"'mq_' || md5({queue_expr})"


def wake_trigger_ddl(schema: str | None) -> tuple[str, str]:
    """The triggers of ``mq_job``; returns ``(create, drop)`` SQL.

    * ``mq_job_wake_on_insert`` sends one NOTIFY per distinct queue of the
      inserted pending jobs; PostgreSQL delivers it when the inserting
      transaction commits, so workers never wake for a job they cannot see yet.
    * ``mq_job_call_on_finish`` enqueues a job's ``on_finish`` call in the
      transaction that finishes it, whichever path finishes it (a worker, a
      cancel, failing a lost job), with the job's id in ``args.finished_jobs``.
      A callback with a cursor collapses onto the one pending, like
      ``MQSource.call``; every finished job is then also recorded in
      ``mq_finished_job`` under that cursor. The WHEN clause keeps the trigger
      free for other jobs.
    """
    prefix = f'"{schema}".' if schema else ""
    finished = _sql_list(JobStates.FINISHED)
    create = f"""
CREATE FUNCTION {prefix}mq_job_wake_on_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify({channel_sql("q.queue")}, '')
    FROM (SELECT DISTINCT queue FROM new_jobs WHERE state = 'pending') AS q;
    RETURN NULL;
END
$$;
CREATE TRIGGER mq_job_wake_on_insert AFTER INSERT ON {prefix}mq_job
    REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION {prefix}mq_job_wake_on_insert();

CREATE FUNCTION {prefix}mq_job_call_on_finish() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- a callback with a cursor collapses; the finished job is recorded in
    -- mq_finished_job for MQSource.take_finished_jobs (an insert: finishing
    -- jobs never wait on each other, nor on the pending callback's row)
    IF NEW.on_finish->>'cursor_key' IS NOT NULL THEN
        INSERT INTO {prefix}mq_finished_job (cursor_key, job_id)
        VALUES (NEW.on_finish->>'cursor_key', NEW.id)
        ON CONFLICT DO NOTHING;
    END IF;
    INSERT INTO {prefix}mq_job (queue, method, args, state, cursor_key, trace)
    VALUES (
        NEW.on_finish->>'queue',
        NEW.on_finish->>'method',
        jsonb_set(coalesce(NEW.on_finish->'args', '{{}}'::jsonb), '{{finished_jobs}}', jsonb_build_array(NEW.id)),
        'pending',
        NEW.on_finish->>'cursor_key',
        jsonb_build_object('on_finish_of', NEW.id)
    )
    ON CONFLICT (cursor_key) WHERE state = 'pending' AND collapsible AND cursor_key IS NOT NULL DO NOTHING;
    RETURN NULL;
END
$$;
CREATE TRIGGER mq_job_call_on_finish AFTER UPDATE OF state ON {prefix}mq_job
    FOR EACH ROW
    WHEN (NEW.on_finish IS NOT NULL AND NEW.state IN ({finished}) AND OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION {prefix}mq_job_call_on_finish();
"""
    drop = f"""
DROP TRIGGER IF EXISTS mq_job_call_on_finish ON {prefix}mq_job;
DROP FUNCTION IF EXISTS {prefix}mq_job_call_on_finish();
DROP TRIGGER IF EXISTS mq_job_wake_on_insert ON {prefix}mq_job;
DROP FUNCTION IF EXISTS {prefix}mq_job_wake_on_insert();
"""
    return create, drop


def _install_wake_trigger(table: sa.Table, schema: str | None) -> None:
    create, drop = wake_trigger_ddl(schema)
    sa.event.listen(table, "after_create", sa.DDL(create))
    sa.event.listen(table, "before_drop", sa.DDL(drop))
