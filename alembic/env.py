"""Alembic environment for psycopg2_mq's migration history.

The database URL comes from ``-x url=...``, else ``$MQ_DATABASE_URL``, else
``sqlalchemy.url`` in the ini file. ``-x schema=NAME`` puts the queue tables and
the version table in the existing schema ``NAME``.

The version table is ``mq_alembic_version`` so that this history never mixes
with an application's own ``alembic_version``.
"""

from __future__ import annotations

import os
from logging.config import fileConfig
from typing import Any

import sqlalchemy as sa
from alembic import context

from psycopg2_mq import make_default_model
from workflows.model import make_workflow_model

VERSION_TABLE = "mq_alembic_version"

config = context.config

# programmatic callers (tests, apps) may keep their own logging setup
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

x_args = context.get_x_argument(as_dictionary=True)
schema: str | None = x_args.get("schema") or None


def build_metadata() -> sa.MetaData:
    """The library's model, which autogenerate compares the database with."""
    md = sa.MetaData(schema=schema)
    make_default_model(md)
    make_workflow_model(md)
    # further layers add their tables here, one call each
    return md


target_metadata = build_metadata()


def database_url() -> sa.URL | None:
    raw = x_args.get("url") or os.environ.get("MQ_DATABASE_URL") or config.get_main_option("sqlalchemy.url")
    if not raw:
        return None
    url = sa.make_url(raw)
    # psycopg2_mq runs on psycopg2; SQLAlchemy 2.1 maps a bare postgresql:// to psycopg (3)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg2")
    return url


def include_name(name: str | None, type_: str, parent_names: dict[str, Any]) -> bool:
    """Autogenerate looks only at our schema and our tables, never at the application's."""
    if type_ == "schema":
        return name == schema
    if type_ == "table":
        return parent_names.get("schema_qualified_table_name", name) in target_metadata.tables
    return True


def context_options() -> dict[str, Any]:
    return {
        "target_metadata": target_metadata,
        "version_table": VERSION_TABLE,
        "version_table_schema": schema,
        # read by the migrations to qualify their objects (None: the default schema)
        "mq_schema": schema,
        "include_schemas": schema is not None,
        "include_name": include_name,
        "compare_type": True,
        "compare_server_default": True,
    }


def run_migrations_offline() -> None:
    """Emit SQL to stdout (``--sql``); only the dialect of the URL matters."""
    context.configure(
        url=database_url() or sa.make_url("postgresql+psycopg2://"),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **context_options(),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    # an application may hand over its own connection (alembic's "sharing a connection" recipe)
    connection: sa.Connection | None = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, **context_options())
        with context.begin_transaction():
            context.run_migrations()
        return

    url = database_url()
    if not url:
        raise RuntimeError("no database URL: pass -x url=postgresql+psycopg2://... or set MQ_DATABASE_URL")
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            context.configure(connection=conn, **context_options())
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
