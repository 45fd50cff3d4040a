"""Exceptions a job or a caller may raise."""

from __future__ import annotations

from typing import Any


class FailedJobError(Exception):
    """Raise from ``execute_job`` to fail the job with a result of your own.

    ``result`` is stored as the job's JSON result. With ``update_cursor=True``
    the job's cursor changes are saved too, as they would be on success.
    """

    def __init__(self, result: Any = None, update_cursor: bool = False) -> None:
        super().__init__(result)
        self.result = result
        self.update_cursor = update_cursor


class JobNotFoundError(LookupError):
    """No job has the given id."""


class InvalidJobStateError(ValueError):
    """The job is not in a state the operation accepts."""


class RetryJob(Exception):
    """Raise from ``execute_job`` to run the job again after ``delay`` seconds.

    A snooze: the job goes back to pending and this attempt does not count
    against its ``max_attempts``.
    """

    def __init__(self, delay: float = 0.0, reason: str | None = None) -> None:
        super().__init__(reason or f"retry in {delay}s")
        if delay < 0:
            raise ValueError("delay must not be negative")
        self.delay = float(delay)
        self.reason = reason


class JobTimeoutError(Exception):
    """A job ran past its timeout and was stopped (see ``RunInChildProcess``)."""
