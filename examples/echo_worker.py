"""The seed README's worker, runnable: serve the queue ``echo`` until SIGTERM or Ctrl-C.

    python3 examples/echo_worker.py postgresql+psycopg2://user:password@host/dbname

(or set ``MQ_DATABASE_URL`` and leave the argument out). Queue jobs for it with
``examples/echo_source.py``. The same queue can also be served by the generic
worker command: ``python3 -m psycopg2_mq worker --queue echo=examples.echo_worker:EchoQueue``.
"""

from __future__ import annotations

import logging
import os
import sys

from sqlalchemy import MetaData, create_engine

from psycopg2_mq import MQWorker, make_default_model
from psycopg2_mq.cli import sqlalchemy_url


class EchoQueue:
    """Every method of the queue ``echo`` answers with a greeting."""

    def execute_job(self, job):
        return f'hello, {job.args["name"]} from method="{job.method}"'


def database_url() -> str:
    if len(sys.argv) > 1:
        return sys.argv[1]
    if os.environ.get("MQ_DATABASE_URL"):
        return os.environ["MQ_DATABASE_URL"]
    sys.exit(f"usage: {sys.argv[0]} DATABASE_URL   (or set MQ_DATABASE_URL)")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # sqlalchemy_url: a bare postgresql:// URL would pick SQLAlchemy's default driver, not psycopg2
    engine = create_engine(sqlalchemy_url(database_url()))
    metadata = MetaData()
    model = make_default_model(metadata)
    # creates the tables only if they are missing; an application would use its migrations
    metadata.create_all(engine)
    worker = MQWorker(
        engine=engine,
        queues={
            "echo": EchoQueue(),
        },
        model=model,
        # SIGTERM / Ctrl-C: finish the running job, claim nothing new, return from run()
        capture_signals=True,
    )
    worker.run()
