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
