"""workflows: wf_run and wf_step

Revision ID: mq_0002
Revises: mq_0001
Create Date: 2026-11-28 00:00:00

Self-contained like 0001: it does not import ``workflows``, so it keeps creating
exactly this schema whatever the package's model becomes later. It must match
``workflows.model.make_workflow_model`` (the drift test compares them).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "mq_0002"
down_revision: str | Sequence[str] | None = "mq_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _schema() -> str | None:
    """The schema chosen with ``-x schema=`` (or ``mq_schema=`` in context.configure)."""
    return op.get_context().opts.get("mq_schema")


def _tstz() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    schema = _schema()

    op.create_table(
        "wf_run",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("workflow", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=True),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("args", postgresql.JSONB(), nullable=False),
        sa.Column("definition", postgresql.JSONB(), nullable=False),
        sa.Column("result", postgresql.JSONB(), nullable=True),
        sa.Column("coordinator_queue", sa.Text(), nullable=False),
        sa.Column("unfinished", sa.Integer(), nullable=False),
        sa.Column("created_time", _tstz(), server_default=sa.func.now(), nullable=False),
        sa.Column("finished_time", _tstz(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("wf_run_pkey")),
        sa.CheckConstraint(
            "state IN ('running', 'canceling', 'completed', 'failed', 'canceled')", name=op.f("ck_wf_run_state")
        ),
        schema=schema,
    )
    # idempotency key of start(): one run per (workflow, key)
    op.create_index(
        op.f("uq_wf_run_key"),
        "wf_run",
        ["workflow", "key"],
        unique=True,
        postgresql_where=sa.text("key IS NOT NULL"),
        schema=schema,
    )
    op.create_index(op.f("ix_wf_run_workflow"), "wf_run", ["workflow", "id"], schema=schema)

    op.create_table(
        "wf_step",
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("parent", sa.Text(), nullable=True),
        sa.Column("item_index", sa.Integer(), nullable=True),
        sa.Column("spec", postgresql.JSONB(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("waiting_on", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("items_left", sa.Integer(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("job_id", sa.BigInteger(), nullable=True),
        sa.Column("result", postgresql.JSONB(), nullable=True),
        sa.Column("queued_time", _tstz(), nullable=True),
        sa.Column("finished_time", _tstz(), nullable=True),
        sa.PrimaryKeyConstraint("run_id", "name", name=op.f("wf_step_pkey")),
        sa.ForeignKeyConstraint(
            ["run_id"],
            [f"{schema}.wf_run.id" if schema else "wf_run.id"],
            name=op.f("wf_step_run_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.CheckConstraint(
            "state IN ('waiting', 'queued', 'completed', 'failed', 'skipped', 'canceled')",
            name=op.f("ck_wf_step_state"),
        ),
        schema=schema,
    )
    # the coordinator finds a step by its current job
    op.create_index(
        op.f("uq_wf_step_job"),
        "wf_step",
        ["job_id"],
        unique=True,
        postgresql_where=sa.text("job_id IS NOT NULL"),
        schema=schema,
    )
    # the items of a mapped step
    op.create_index(
        op.f("ix_wf_step_parent"),
        "wf_step",
        ["run_id", "parent"],
        postgresql_where=sa.text("parent IS NOT NULL"),
        schema=schema,
    )


def downgrade() -> None:
    schema = _schema()
    op.drop_index(op.f("ix_wf_step_parent"), table_name="wf_step", schema=schema)
    op.drop_index(op.f("uq_wf_step_job"), table_name="wf_step", schema=schema)
    op.drop_table("wf_step", schema=schema)
    op.drop_index(op.f("ix_wf_run_workflow"), table_name="wf_run", schema=schema)
    op.drop_index(op.f("uq_wf_run_key"), table_name="wf_run", schema=schema)
    op.drop_table("wf_run", schema=schema)
