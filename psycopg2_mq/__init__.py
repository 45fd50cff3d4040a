"""psycopg2_mq: a job queue that lives in PostgreSQL.

* ``make_default_model(metadata)`` declares the tables (``model.py``).
* ``MQSource`` queues and manages jobs in the caller's transaction (``source.py``).
* ``MQWorker`` claims and runs them on a pool of threads (``worker.py``).
* ``Job`` is what ``execute_job(job)`` receives (``job.py``).
"""

from .errors import FailedJobError, InvalidJobStateError, JobNotFoundError
from .job import Job
from .model import JobStates, Model, make_default_model
from .source import CallRequest, MQSource
from .worker import MQWorker

__all__ = [
    "CallRequest",
    "FailedJobError",
    "InvalidJobStateError",
    "Job",
    "JobNotFoundError",
    "JobStates",
    "MQSource",
    "MQWorker",
    "Model",
    "make_default_model",
]
