"""psycopg2_mq: a job queue that lives in PostgreSQL.

* ``make_default_model(metadata)`` declares the tables (``model.py``).
* ``MQSource`` queues and manages jobs in the caller's transaction (``source.py``).
* ``MQWorker`` claims and runs them on a pool of threads (``worker.py``).
* ``Job`` is what ``execute_job(job)`` receives (``job.py``).
* ``JobPolicy`` sets a queue's retries, lost-job policy and timeout (``policy.py``);
  ``RunInChildProcess`` enforces timeouts by running jobs in child processes.
"""

from .errors import FailedJobError, InvalidJobStateError, JobNotFoundError, JobTimeoutError, RetryJob
from .isolation import ChildJobError, RunInChildProcess
from .job import Job
from .model import JobStates, Model, make_default_model
from .policy import Backoff, JobPolicy, LostPolicy
from .source import CallRequest, MQSource
from .worker import MQWorker

__all__ = [
    "Backoff",
    "CallRequest",
    "ChildJobError",
    "FailedJobError",
    "InvalidJobStateError",
    "Job",
    "JobNotFoundError",
    "JobPolicy",
    "JobStates",
    "JobTimeoutError",
    "LostPolicy",
    "MQSource",
    "MQWorker",
    "Model",
    "RetryJob",
    "RunInChildProcess",
    "make_default_model",
]
