"""psycopg2_mq: a job queue that lives in PostgreSQL.

* ``make_default_model(metadata)`` declares the tables (``model.py``).
* ``MQSource`` queues and manages jobs in the caller's transaction (``source.py``).
* ``MQWorker`` claims and runs them on a pool of threads (``worker.py``).
* ``Job`` is what ``execute_job(job)`` receives (``job.py``).
"""

from .errors import FailedJobError, InvalidJobStateError, JobNotFoundError, RetryJob
from .job import Job
from .model import JobStates, Model, make_default_model
from .policy import Backoff, JobPolicy, LostPolicy
from .source import CallRequest, MQSource
from .worker import MQWorker

__all__ = [
    "Backoff",
    "CallRequest",
    "FailedJobError",
    "InvalidJobStateError",
    "Job",
    "JobNotFoundError",
    "JobPolicy",
    "JobStates",
    "LostPolicy",
    "MQSource",
    "MQWorker",
    "Model",
    "RetryJob",
    "make_default_model",
]
