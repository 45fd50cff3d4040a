"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

Keep this file self-contained: never import psycopg2_mq here, so the migration
stays the same when the library's model changes. Qualify every object with
``_schema()`` (schema=... on op calls, a prefix in raw SQL).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
${imports if imports else ""}
from alembic import op

# revision identifiers, used by Alembic.
revision: str = ${repr(up_revision)}
down_revision: str | Sequence[str] | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}


def _schema() -> str | None:
    """The schema chosen with ``-x schema=`` (or ``mq_schema=`` in context.configure)."""
    return op.get_context().opts.get("mq_schema")


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
