import sqlalchemy as sa


def test_tables_exist(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        names = set(sa.inspect(conn).get_table_names())
    assert {"mq_job", "mq_cursor", "mq_worker"} <= names
