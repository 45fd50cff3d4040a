"""The workflow tables: ``wf_run`` (one row per run) and ``wf_step`` (one per step).

``make_workflow_model(metadata)`` declares them on the caller's ``MetaData``,
next to the queue's tables (and in the same alembic history).

What keeps a coordinator's work proportional to the steps that changed:

* A run's definition is stored twice: whole in ``wf_run.definition`` (for
  people and renderers), and split up in ``wf_step.spec`` (each step's call,
  rule, upstream and downstream names). The coordinator reads only the specs
  of the steps it touches, never the whole snapshot.
* ``wf_step.waiting_on`` counts a step's upstream steps that are not terminal
  yet, and ``items_left`` a mapped step's unfinished items; a finishing step
  decrements its dependents' counters in one UPDATE, and only the steps that
  reach zero are read and decided.
* ``wf_run.unfinished`` counts the run's steps that are not terminal, so the
  end of a run is known without scanning its steps.
* Steps are found by primary key ``(run_id, name)``, by their current job
  (``uq_wf_step_job``) and, for the items of a mapped step, by
  ``ix_wf_step_parent``.

Times are ``timestamptz`` from the database clock, like the queue's.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql.elements import conv

from .rules import RunStates, StepStates


def _sql_list(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


@dataclass(frozen=True)
class WorkflowModel:
    """The workflow tables of one installation."""

    metadata: sa.MetaData
    run_table: sa.Table
    step_table: sa.Table

    @staticmethod
    def run_channel(run_id: int) -> str:
        """The LISTEN/NOTIFY channel on which a run announces that it finished."""
        return f"wf_run_{int(run_id)}"


def make_workflow_model(metadata: sa.MetaData) -> WorkflowModel:
    """Declare ``wf_run`` and ``wf_step`` on ``metadata`` and return the model.

    Call it once per ``MetaData`` (it uses ``metadata.schema`` like the queue).
    """
    tstz = sa.DateTime(timezone=True)
    run = sa.Table(
        "wf_run",
        metadata,
        sa.Column("id", sa.BigInteger, sa.Identity()),
        sa.Column("workflow", sa.Text, nullable=False),
        #: idempotency key: a second start with the same (workflow, key) returns this run
        sa.Column("key", sa.Text, nullable=True),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("args", JSONB, nullable=False),
        #: the snapshot of the definition the run follows, whatever the code says later
        sa.Column("definition", JSONB, nullable=False),
        #: the results of the sink steps, once the run is finished
        sa.Column("result", JSONB, nullable=True),
        #: the queue the run's coordinator jobs go to
        sa.Column("coordinator_queue", sa.Text, nullable=False),
        #: steps not terminal yet; the run finishes when it reaches 0
        sa.Column("unfinished", sa.Integer, nullable=False),
        sa.Column("created_time", tstz, nullable=False, server_default=sa.func.now()),
        sa.Column("finished_time", tstz, nullable=True),
        # names fixed (conv): an application's naming convention must not rename them
        sa.PrimaryKeyConstraint("id", name=conv("wf_run_pkey")),
        sa.CheckConstraint(f"state IN ({_sql_list(RunStates.ALL)})", name=conv("ck_wf_run_state")),
        sa.Index(
            conv("uq_wf_run_key"), "workflow", "key", unique=True, postgresql_where=sa.text("key IS NOT NULL")
        ),
        sa.Index(conv("ix_wf_run_workflow"), "workflow", "id"),
    )
    step = sa.Table(
        "wf_step",
        metadata,
        sa.Column(
            "run_id",
            sa.BigInteger,
            sa.ForeignKey(run.c.id, ondelete="CASCADE", name=conv("wf_step_run_id_fkey")),
            nullable=False,
        ),
        #: the step's name; the items of a mapped step are "name[0]", "name[1]", ...
        sa.Column("name", sa.Text, nullable=False),
        #: for a map item: the mapped step it belongs to
        sa.Column("parent", sa.Text, nullable=True),
        sa.Column("item_index", sa.Integer, nullable=True),
        #: this step's part of the snapshot (call, rule, upstream, downstream) or,
        #: for a map item, {"item": value}
        sa.Column("spec", JSONB, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        #: upstream steps not terminal yet; the step is decided when it reaches 0
        sa.Column("waiting_on", sa.Integer, nullable=False, server_default=sa.text("0")),
        #: a mapped step's items not terminal yet
        sa.Column("items_left", sa.Integer, nullable=True),
        #: jobs called for this step so far (retries included)
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        #: the step's current job (``mq_job.id``)
        sa.Column("job_id", sa.BigInteger, nullable=True),
        #: the job's result (an error result when it failed)
        sa.Column("result", JSONB, nullable=True),
        sa.Column("queued_time", tstz, nullable=True),
        sa.Column("finished_time", tstz, nullable=True),
        sa.PrimaryKeyConstraint("run_id", "name", name=conv("wf_step_pkey")),
        sa.CheckConstraint(f"state IN ({_sql_list(StepStates.STORED)})", name=conv("ck_wf_step_state")),
        sa.Index(
            conv("uq_wf_step_job"), "job_id", unique=True, postgresql_where=sa.text("job_id IS NOT NULL")
        ),
        sa.Index(
            conv("ix_wf_step_parent"), "run_id", "parent", postgresql_where=sa.text("parent IS NOT NULL")
        ),
    )
    return WorkflowModel(metadata=metadata, run_table=run, step_table=step)
