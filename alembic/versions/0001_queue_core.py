"""queue core: mq_job, mq_cursor, mq_worker, mq_finished_job and the triggers of mq_job

Revision ID: mq_0001
Revises:
Create Date: 2025-01-01 00:00:00

Self-contained on purpose: it does not import psycopg2_mq, so it keeps creating
exactly this schema whatever the library's model becomes later.

Every name goes through ``op.f()`` so that a naming convention on the target
metadata of an application that folds this history into its own cannot rename
our constraints and indexes. The primary keys carry PostgreSQL's default names
(``<table>_pkey``), which is what ``metadata.create_all`` of the model gives.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

# revision identifiers, used by Alembic. "mq_" keeps the id unique next to an application's own ids.
revision: str = "mq_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("psycopg2_mq",)
depends_on: str | Sequence[str] | None = None


def _schema() -> str | None:
    """The schema chosen with ``-x schema=`` (or ``mq_schema=`` in context.configure)."""
    return op.get_context().opts.get("mq_schema")


def _prefix(schema: str | None) -> str:
    return f'"{schema}".' if schema else ""


def _tstz() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    schema = _schema()

    op.create_table(
        "mq_job",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("method", sa.Text(), nullable=False),
        sa.Column("args", postgresql.JSONB(), nullable=False),
        sa.Column("result", postgresql.JSONB(), nullable=True),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("cursor_key", sa.Text(), nullable=True),
        sa.Column("collapsible", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("trace", postgresql.JSONB(), nullable=True),
        sa.Column("on_finish", postgresql.JSONB(), nullable=True),
        sa.Column("created_time", _tstz(), server_default=sa.func.now(), nullable=False),
        sa.Column("scheduled_time", _tstz(), server_default=sa.func.now(), nullable=False),
        sa.Column("start_time", _tstz(), nullable=True),
        sa.Column("end_time", _tstz(), nullable=True),
        sa.Column("worker_id", sa.Integer(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=True),
        sa.Column("backoff", postgresql.JSONB(), nullable=True),
        sa.Column("lost_policy", sa.Text(), nullable=True),
        sa.Column("timeout", sa.Float(), nullable=True),
        sa.Column("deadline", _tstz(), nullable=True),
        sa.Column("errors", postgresql.JSONB(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("mq_job_pkey")),
        sa.CheckConstraint(
            "state IN ('pending', 'running', 'completed', 'failed', 'canceled', 'lost')",
            name=op.f("ck_mq_job_state"),
        ),
        sa.CheckConstraint("queue <> '' AND method <> ''", name=op.f("ck_mq_job_names")),
        sa.CheckConstraint("lost_policy IN ('hold', 'retry', 'fail')", name=op.f("ck_mq_job_lost_policy")),
        sa.CheckConstraint("max_attempts >= 1", name=op.f("ck_mq_job_max_attempts")),
        sa.CheckConstraint("timeout > 0", name=op.f("ck_mq_job_timeout")),
        sa.CheckConstraint(
            "on_finish IS NULL OR (jsonb_typeof(on_finish) = 'object'"
            " AND coalesce(on_finish->>'queue', '') <> '' AND coalesce(on_finish->>'method', '') <> ''"
            " AND coalesce(jsonb_typeof(on_finish->'args'), 'object') = 'object')",
            name=op.f("ck_mq_job_on_finish"),
        ),
        schema=schema,
    )
    # claim query: only pending jobs are indexed, however many finished jobs pile up
    op.create_index(
        op.f("ix_mq_job_claim"),
        "mq_job",
        ["queue", "scheduled_time", "id"],
        postgresql_where=sa.text("state = 'pending'"),
        schema=schema,
    )
    # at most one pending collapsible job per cursor (MQSource.call: ON CONFLICT DO NOTHING)
    op.create_index(
        op.f("uq_mq_job_pending_cursor"),
        "mq_job",
        ["cursor_key"],
        unique=True,
        postgresql_where=sa.text("state = 'pending' AND collapsible"),
        schema=schema,
    )
    op.create_index(
        op.f("ix_mq_job_pending_cursor"),
        "mq_job",
        ["cursor_key", "scheduled_time", "id"],
        postgresql_where=sa.text("state = 'pending' AND cursor_key IS NOT NULL"),
        schema=schema,
    )
    # at most one running-or-lost job per cursor
    op.create_index(
        op.f("uq_mq_job_active_cursor"),
        "mq_job",
        ["cursor_key"],
        unique=True,
        postgresql_where=sa.text("state IN ('running', 'lost')"),
        schema=schema,
    )
    # finished jobs by age, for pruning
    op.create_index(
        op.f("ix_mq_job_finished"),
        "mq_job",
        ["state", "end_time"],
        postgresql_where=sa.text("state IN ('completed', 'failed', 'canceled')"),
        schema=schema,
    )
    op.create_index(
        op.f("ix_mq_job_running_worker"),
        "mq_job",
        ["worker_id"],
        postgresql_where=sa.text("state = 'running'"),
        schema=schema,
    )

    op.create_table(
        "mq_cursor",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("properties", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("updated_time", _tstz(), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("mq_cursor_pkey")),
        schema=schema,
    )

    op.create_table(
        "mq_worker",
        sa.Column("id", sa.Integer(), sa.Identity(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("queues", postgresql.JSONB(), nullable=False),
        sa.Column("started_time", _tstz(), server_default=sa.func.now(), nullable=False),
        sa.Column("missing_since", _tstz(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("mq_worker_pkey")),
        schema=schema,
    )

    op.create_table(
        "mq_finished_job",
        sa.Column("cursor_key", sa.Text(), nullable=False),
        sa.Column("job_id", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("cursor_key", "job_id", name=op.f("mq_finished_job_pkey")),
        schema=schema,
    )

    # The function bodies must stay byte-identical to the model's DDL: the tests compare pg_get_functiondef.
    prefix = _prefix(schema)
    # one NOTIFY per distinct queue of the inserted pending jobs, delivered at commit
    op.execute(
        f"""
CREATE FUNCTION {prefix}mq_job_wake_on_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('mq_' || md5(q.queue), '')
    FROM (SELECT DISTINCT queue FROM new_jobs WHERE state = 'pending') AS q;
    RETURN NULL;
END
$$
"""
    )
    op.execute(
        f"""
CREATE TRIGGER mq_job_wake_on_insert AFTER INSERT ON {prefix}mq_job
    REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION {prefix}mq_job_wake_on_insert()
"""
    )
    # enqueue a job's on_finish call in the transaction that finishes it; record it under the callback's cursor
    op.execute(
        f"""
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
    ON CONFLICT (cursor_key) WHERE state = 'pending' AND collapsible DO NOTHING;
    RETURN NULL;
END
$$
"""
    )
    op.execute(
        f"""
CREATE TRIGGER mq_job_call_on_finish AFTER UPDATE OF state ON {prefix}mq_job
    FOR EACH ROW
    WHEN (NEW.on_finish IS NOT NULL AND NEW.state IN ('completed', 'failed', 'canceled') AND OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION {prefix}mq_job_call_on_finish()
"""
    )


def downgrade() -> None:
    schema = _schema()
    prefix = _prefix(schema)
    for name in ("mq_job_call_on_finish", "mq_job_wake_on_insert"):
        op.execute(f"DROP TRIGGER {name} ON {prefix}mq_job")
        op.execute(f"DROP FUNCTION {prefix}{name}()")
    op.drop_table("mq_finished_job", schema=schema)
    op.drop_table("mq_worker", schema=schema)
    op.drop_table("mq_cursor", schema=schema)
    for name in (
        "ix_mq_job_running_worker",
        "ix_mq_job_finished",
        "uq_mq_job_active_cursor",
        "ix_mq_job_pending_cursor",
        "uq_mq_job_pending_cursor",
        "ix_mq_job_claim",
    ):
        op.drop_index(op.f(name), table_name="mq_job", schema=schema)
    op.drop_table("mq_job", schema=schema)
