"""The alembic history builds exactly the schema that ``metadata.create_all`` builds.

One scratch database is migrated with ``alembic upgrade head`` (run the way the
command line runs it, the URL passed as ``-x url=...``), another gets
``create_all`` of a fresh model; then they are compared twice:

* with alembic's autogenerate comparison (types, nullability, server defaults,
  identity, indexes), which is what ``alembic check`` would report;
* with a dump of the PostgreSQL catalogs, which also covers what autogenerate
  ignores: check constraints, partial-index WHERE clauses, triggers and their
  functions, sequences, column order.

``test_comparisons_catch_divergence`` proves both comparisons have teeth.
"""

from __future__ import annotations

import argparse
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import alembic.command
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from psycopg2_mq import make_default_model
from workflows.model import make_workflow_model

ALEMBIC_INI = Path(__file__).resolve().parent.parent / "alembic.ini"
VERSIONS_DIR = ALEMBIC_INI.parent / "alembic" / "versions"
VERSION_TABLE = "mq_alembic_version"

Catalog = dict[str, list[tuple[Any, ...]]]


def alembic_config(url: sa.URL, *x_args: str, output_buffer: io.StringIO | None = None) -> Config:
    """The Config that ``alembic -c alembic.ini -x url=... [-x ...]`` builds."""
    cfg = Config(str(ALEMBIC_INI), output_buffer=output_buffer)
    cfg.cmd_opts = argparse.Namespace(x=[f"url={url.render_as_string(hide_password=False)}", *x_args])
    # keep pytest's logging setup: env.py would otherwise load the ini's logging sections
    cfg.attributes["configure_logger"] = False
    return cfg


def head_revision() -> str:
    """The newest revision of our history (mq_0001 is its base, whatever follows)."""
    head = ScriptDirectory.from_config(Config(str(ALEMBIC_INI))).get_current_head()
    assert head is not None
    return head


def model_metadata(schema: str | None = None) -> sa.MetaData:
    """Everything the history's head must build: the same calls as ``build_metadata`` in alembic/env.py."""
    md = sa.MetaData(schema=schema)
    make_default_model(md)
    make_workflow_model(md)
    return md


def create_all(url: sa.URL, schema: str | None = None) -> None:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            model_metadata(schema).create_all(conn)
    finally:
        engine.dispose()


@pytest.fixture
def connect() -> Iterator[Callable[[sa.URL], sa.Connection]]:
    """``connect(url)``: a connection closed (and its engine disposed) after the test."""
    engines: list[sa.Engine] = []
    conns: list[sa.Connection] = []

    def _connect(url: sa.URL) -> sa.Connection:
        engines.append(sa.create_engine(url, poolclass=sa.pool.NullPool))
        conns.append(engines[-1].connect())
        return conns[-1]

    yield _connect
    for conn in conns:
        conn.close()
    for engine in engines:
        engine.dispose()


# version tables (and their primary keys): ours, or an application's when our history is folded into its own
_VERSION_TABLES = "('mq_alembic_version', 'alembic_version')"
_VERSION_RELATIONS = (
    "('mq_alembic_version', 'mq_alembic_version_pkc', 'alembic_version', 'alembic_version_pkc')"
)
_NOT_VERSION_TABLE = f"c.relname NOT IN {_VERSION_RELATIONS}"

# each query lists one kind of object of schema :schema, in a stable order
_CATALOG_QUERIES: dict[str, str] = {
    "relations": f"""
        SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = :schema AND {_NOT_VERSION_TABLE}
        ORDER BY 1""",
    "columns": f"""
        SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE n.nspname = :schema AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped
          AND {_NOT_VERSION_TABLE}
        ORDER BY c.relname, a.attnum""",
    # identity columns own a sequence: its parameters are part of the identity
    "sequences": """
        SELECT c.relname, format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement, s.seqmax, s.seqmin,
               s.seqcache, s.seqcycle
        FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = :schema
        ORDER BY 1""",
    "constraints": f"""
        SELECT c.relname, k.conname, k.contype, pg_get_constraintdef(k.oid)
        FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = :schema AND {_NOT_VERSION_TABLE}
        ORDER BY 1, 2""",
    "indexes": f"""
        SELECT tablename, indexname, indexdef FROM pg_indexes
        WHERE schemaname = :schema AND tablename NOT IN {_VERSION_TABLES}
        ORDER BY 1, 2""",
    "triggers": """
        SELECT c.relname, t.tgname, t.tgenabled, pg_get_triggerdef(t.oid)
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = :schema AND NOT t.tgisinternal
        ORDER BY 1, 2""",
    # every function of the schema (the trigger functions mq_*, and any a later layer adds)
    "functions": """
        SELECT p.proname, pg_get_functiondef(p.oid)
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = :schema
        ORDER BY 1""",
}


def catalog(conn: sa.Connection, schema: str = "public") -> Catalog:
    return {
        kind: [tuple(row) for row in conn.execute(sa.text(sql), {"schema": schema})]
        for kind, sql in _CATALOG_QUERIES.items()
    }


def assert_same_catalog(migrated: Catalog, model: Catalog) -> None:
    # compared kind by kind so that a failure names the kind and shows a readable diff
    for kind in _CATALOG_QUERIES:
        assert migrated[kind] == model[kind], f"{kind} differ between the alembic history and the model"


def autogenerate_diffs(conn: sa.Connection, metadata: sa.MetaData) -> list[Any]:
    ctx = MigrationContext.configure(
        conn,
        opts={
            "version_table": VERSION_TABLE,
            "compare_type": True,
            # no false positives seen on PostgreSQL 15/16: now(), true, 0 and '{}'::jsonb
            # all compare equal, so the check stays on
            "compare_server_default": True,
        },
    )
    return compare_metadata(ctx, metadata)


@pytest.fixture(scope="module")
def migrated_url(create_database: Callable[[str], sa.URL]) -> sa.URL:
    url = create_database("mq_alembic")
    alembic.command.upgrade(alembic_config(url), "head")
    return url


@pytest.fixture(scope="module")
def model_url(create_database: Callable[[str], sa.URL]) -> sa.URL:
    url = create_database("mq_create_all")
    create_all(url)
    return url


def test_upgrade_head_matches_model_autogenerate(migrated_url: sa.URL, connect) -> None:
    diffs = autogenerate_diffs(connect(migrated_url), model_metadata())
    assert diffs == []


def test_upgrade_head_matches_model_catalog(migrated_url: sa.URL, model_url: sa.URL, connect) -> None:
    migrated = catalog(connect(migrated_url))
    model = catalog(connect(model_url))
    # guard against a vacuous pass (e.g. both dumps empty because of a wrong schema name)
    assert {"mq_job", "mq_cursor", "mq_worker"} <= {r[0] for r in model["relations"] if r[1] == "r"}
    assert "mq_job_wake_on_insert" in {r[0] for r in model["functions"]}
    assert_same_catalog(migrated, model)


def test_alembic_check_finds_nothing_to_do(migrated_url: sa.URL) -> None:
    """``alembic -x url=... check``: autogenerate through env.py, as a developer runs it."""
    alembic.command.check(alembic_config(migrated_url))


def test_version_is_recorded_in_own_table(migrated_url: sa.URL, connect) -> None:
    conn = connect(migrated_url)
    assert conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all() == [
        head_revision()
    ]
    assert not sa.inspect(conn).has_table("alembic_version")


def test_comparisons_catch_divergence(migrated_url: sa.URL, model_url: sa.URL, connect) -> None:
    """Each comparison fails when the migrated schema drifts; the drift is rolled back."""
    model = catalog(connect(model_url))
    conn = connect(migrated_url)
    drifts = {
        # a partial index's WHERE clause: only the catalog dump sees it
        "indexes": """
            DROP INDEX ix_mq_job_claim;
            CREATE INDEX ix_mq_job_claim ON mq_job (queue, scheduled_time, id) WHERE state = 'running'""",
        "constraints": """
            ALTER TABLE mq_job DROP CONSTRAINT ck_mq_job_names;
            ALTER TABLE mq_job ADD CONSTRAINT ck_mq_job_names CHECK (queue <> '')""",
        "functions": """
            CREATE OR REPLACE FUNCTION mq_job_wake_on_insert() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RETURN NULL; END $$""",
        "triggers": "ALTER TABLE mq_job DISABLE TRIGGER mq_job_wake_on_insert",
        "columns": "ALTER TABLE mq_job ALTER COLUMN worker_id TYPE bigint",
    }
    for kind, ddl in drifts.items():
        with conn.begin() as tx:
            conn.exec_driver_sql(ddl)
            drifted = catalog(conn)
            assert drifted[kind] != model[kind], kind
            with pytest.raises(AssertionError):
                assert_same_catalog(drifted, model)
            if kind == "columns":
                diffs = autogenerate_diffs(conn, model_metadata())
                assert [d[0][0] for d in diffs] == ["modify_type"]
            tx.rollback()
    assert_same_catalog(catalog(conn), model)


def test_downgrade_base_removes_everything(create_database: Callable[[str], sa.URL], connect) -> None:
    url = create_database("mq_alembic_down")
    with connect(url) as conn:
        empty = catalog(conn)  # whatever the template database holds
    cfg = alembic_config(url)
    alembic.command.upgrade(cfg, "head")
    alembic.command.downgrade(cfg, "base")

    conn = connect(url)
    assert_same_catalog(catalog(conn), empty)
    leftovers = conn.execute(
        sa.text(
            r"""
            SELECT 'relation', n.nspname || '.' || c.relname FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relname LIKE 'mq\_%' AND c.relname NOT IN ('mq_alembic_version', 'mq_alembic_version_pkc')
            UNION ALL
            SELECT 'function', p.proname FROM pg_proc p WHERE p.proname LIKE 'mq\_%'
            UNION ALL
            SELECT 'trigger', t.tgname FROM pg_trigger t WHERE t.tgname LIKE 'mq\_%'
            """
        )
    ).all()
    assert leftovers == []
    assert conn.execute(sa.text(f"SELECT count(*) FROM {VERSION_TABLE}")).scalar_one() == 0

    # and the history can be replayed on the emptied database
    conn.close()
    alembic.command.upgrade(cfg, "head")
    assert autogenerate_diffs(connect(url), model_metadata()) == []


def test_offline_sql(create_database: Callable[[str], sa.URL], model_url: sa.URL, connect) -> None:
    """``alembic upgrade head --sql`` emits a script that builds the same schema."""
    url = create_database("mq_alembic_sql")
    out = io.StringIO()
    alembic.command.upgrade(alembic_config(url, output_buffer=out), "head", sql=True)
    script = out.getvalue()
    for table in ("mq_job", "mq_cursor", "mq_worker", VERSION_TABLE):
        assert f"CREATE TABLE {table} (" in script
    assert "CREATE TRIGGER mq_job_wake_on_insert" in script
    assert "INSERT INTO mq_alembic_version (version_num) VALUES ('mq_0001')" in script
    assert f"'{head_revision()}'" in script

    # offline mode does not touch the database; run the script the way psql would
    assert catalog(connect(url))["relations"] == []
    # autocommit: the script brings its own BEGIN/COMMIT
    psql_like = connect(url).execution_options(isolation_level="AUTOCOMMIT")
    with psql_like.connection.driver_connection.cursor() as cur:
        cur.execute(script)
    assert_same_catalog(catalog(connect(url)), catalog(connect(model_url)))


def test_schema_option(create_database: Callable[[str], sa.URL], connect) -> None:
    """``-x schema=NAME`` builds in NAME what ``create_all`` of ``MetaData(schema=NAME)`` builds."""
    schema = "mq_jobs"
    migrated_url, model_url = create_database("mq_alembic_schema"), create_database("mq_create_all_schema")
    for url in (migrated_url, model_url):
        with connect(url) as conn, conn.begin():
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')

    cfg = alembic_config(migrated_url, f"schema={schema}")
    alembic.command.upgrade(cfg, "head")
    create_all(model_url, schema)

    migrated = catalog(connect(migrated_url), schema)
    assert {"mq_job", "mq_cursor", "mq_worker"} <= {r[0] for r in migrated["relations"] if r[1] == "r"}
    assert_same_catalog(migrated, catalog(connect(model_url), schema))
    # the version table lives in the schema too; nothing landed in public
    conn = connect(migrated_url)
    assert sa.inspect(conn).has_table(VERSION_TABLE, schema=schema)
    assert catalog(conn)["relations"] == []
    alembic.command.check(cfg)

    alembic.command.downgrade(cfg, "base")
    assert catalog(connect(migrated_url), schema)["relations"] == []


# An application's own alembic environment: plain env.py, default version table, and a
# naming convention that must not rename our constraints (the migration wraps names in op.f()).
_APP_ENV_PY = """
import sqlalchemy as sa
from alembic import context

target_metadata = sa.MetaData(
    naming_convention={"ck": "ck_%(table_name)s_%(constraint_name)s", "pk": "pk_%(table_name)s"}
)
engine = sa.create_engine(context.config.get_main_option("sqlalchemy.url"), poolclass=sa.pool.NullPool)
with engine.connect() as conn:
    context.configure(connection=conn, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
"""

_APP_REVISION = """
import sqlalchemy as sa
from alembic import op

revision = "app_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table("app_user", sa.Column("id", sa.Integer, primary_key=True))


def downgrade():
    op.drop_table("app_user")
"""


def test_fold_into_application_history(
    create_database: Callable[[str], sa.URL], model_url: sa.URL, connect, tmp_path: Path
) -> None:
    """The recipe of docs/migrations.md: our versions directory in the app's version_locations."""
    (tmp_path / "versions").mkdir()
    (tmp_path / "env.py").write_text(_APP_ENV_PY)
    (tmp_path / "versions" / "app_0001_users.py").write_text(_APP_REVISION)
    url = create_database("mq_alembic_app")

    cfg = Config()
    cfg.set_main_option("script_location", str(tmp_path))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", os.pathsep.join([str(tmp_path / "versions"), str(VERSIONS_DIR)]))
    cfg.set_main_option("sqlalchemy.url", url.render_as_string(hide_password=False).replace("%", "%%"))

    def versions() -> set[str]:
        with connect(url) as conn:
            return set(conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars())

    alembic.command.upgrade(cfg, "psycopg2_mq@head")
    assert versions() == {head_revision()}
    assert_same_catalog(catalog(connect(url)), catalog(connect(model_url)))

    alembic.command.upgrade(cfg, "heads")
    assert versions() == {head_revision(), "app_0001"}

    alembic.command.downgrade(cfg, "psycopg2_mq@base")
    assert versions() == {"app_0001"}
    # only the application's table is left (its primary key named by its naming convention)
    assert {r[0] for r in catalog(connect(url))["relations"]} == {
        "app_user",
        "app_user_id_seq",
        "pk_app_user",
    }


def test_this_code_runs_on_the_0002_schema_and_0003_upgrades_in_place(
    create_database: Callable[[str], sa.URL],
) -> None:
    """Workers and sources may be upgraded before the 0003 migration runs: the
    new ``ON CONFLICT`` clauses also infer 0002's cursor indexes."""
    from sqlalchemy.orm import Session

    from psycopg2_mq import MQSource, make_default_model

    url = create_database("mq_alembic_0002")
    cfg = alembic_config(url)
    alembic.command.upgrade(cfg, "mq_0002")
    engine = sa.create_engine(url)
    model = make_default_model(sa.MetaData())
    try:
        for revision in ("mq_0002", "mq_0003"):
            if revision == "mq_0003":
                alembic.command.upgrade(cfg, "mq_0003")
            with Session(engine) as session, session.begin():
                source = MQSource(dbsession=session, model=model)
                key = f"k-{revision}"
                first = source.call("q", "m", {}, cursor_key=key)
                assert source.call("q", "m", {}, cursor_key=key) is first  # collapsed
                ids = source.call_many(
                    [("q", "m", {}), {"queue": "q", "method": "m", "args": {}, "cursor_key": key}]
                )
                assert ids[1] == first.id
                # on_finish (the trigger's ON CONFLICT) collapses too
                done = [
                    source.call(
                        "q", "m", {}, on_finish={"queue": "cb", "method": "m", "cursor_key": f"cb-{revision}"}
                    )
                    for _ in range(2)
                ]
                session.flush()
                session.execute(
                    sa.update(model.Job)
                    .where(model.Job.id.in_([j.id for j in done]))
                    .values(state="canceled")
                )
                callbacks = session.scalars(
                    sa.select(model.Job).where(
                        model.Job.queue == "cb", model.Job.cursor_key == f"cb-{revision}"
                    )
                ).all()
                assert len(callbacks) == 1
    finally:
        engine.dispose()
