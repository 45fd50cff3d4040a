"""A worker process for the crash tests: its jobs hang until it is SIGKILLed.

``python -m tests.workflows.crash_worker URL QUEUE`` serves ``QUEUE``
(``steps`` or ``workflows``) with a handler that never returns.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import sqlalchemy as sa

from psycopg2_mq import MQWorker, make_default_model
from workflows import make_workflow_model


class Hang:
    def execute_job(self, job: Any) -> Any:
        time.sleep(3600)


def main(url: str, queue: str) -> None:
    metadata = sa.MetaData()
    model = make_default_model(metadata)
    make_workflow_model(metadata)
    engine = sa.create_engine(url)
    MQWorker(engine=engine, model=model, queues={queue: Hang()}, name=f"crash-{queue}").run()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
