"""The seed README's source, runnable: queue one ``echo.hello`` job and print its id.

    python3 examples/echo_source.py postgresql+psycopg2://user:password@host/dbname [NAME]

(or set ``MQ_DATABASE_URL`` and leave the URL out). Run ``examples/echo_worker.py``
against the same database to execute the job.
"""

from __future__ import annotations

import os
import sys

from sqlalchemy import MetaData, create_engine
from sqlalchemy.orm import sessionmaker

from psycopg2_mq import MQSource, make_default_model
from psycopg2_mq.cli import sqlalchemy_url


def parse_args() -> tuple[str, str]:
    args = sys.argv[1:]
    if args and "://" in args[0]:
        url = args.pop(0)
    elif os.environ.get("MQ_DATABASE_URL"):
        url = os.environ["MQ_DATABASE_URL"]
    else:
        sys.exit(f"usage: {sys.argv[0]} DATABASE_URL [NAME]   (or set MQ_DATABASE_URL)")
    return url, args[0] if args else "Andy"


if __name__ == "__main__":
    url, name = parse_args()
    # sqlalchemy_url: a bare postgresql:// URL would pick SQLAlchemy's default driver, not psycopg2
    engine = create_engine(sqlalchemy_url(url))
    metadata = MetaData()
    model = make_default_model(metadata)
    session_factory = sessionmaker()
    session_factory.configure(bind=engine)

    dbsession = session_factory()
    # MQSource never commits: the job (and the NOTIFY that wakes the workers)
    # becomes visible when this transaction commits, at the end of the block
    with dbsession.begin():
        mq = MQSource(
            dbsession=dbsession,
            model=model,
        )
        job = mq.call("echo", "hello", {"name": name})
        print(f"queued job={job.id}")
