"""The job context handed to ``execute_job(job)``."""

from __future__ import annotations

from datetime import datetime
from typing import Any


class Job:
    """One claimed execution of a job.

    ``attempt`` counts the claims of this job (1 on its first run); together with
    ``id`` it identifies this execution, which is what an idempotent job keys on.
    ``cursor`` is the cursor's shared state (``{}`` for a new cursor, ``None``
    without a ``cursor_key``); changes to it are saved when the job completes.
    """

    def __init__(
        self,
        *,
        id: int,
        queue: str,
        method: str,
        args: Any,
        cursor: dict[str, Any] | None,
        cursor_key: str | None,
        trace: Any,
        attempt: int,
        scheduled_time: datetime | None = None,
        timeout: float | None = None,
    ) -> None:
        self.id = id
        self.queue = queue
        self.method = method
        self.args = args
        self.cursor = cursor
        self.cursor_key = cursor_key
        self.trace = trace
        self.attempt = attempt
        self.scheduled_time = scheduled_time
        #: seconds this attempt may run (the call's or the queue's policy), or None
        self.timeout = timeout

    def extend(self, **kw: Any) -> None:
        """Attach extra attributes, e.g. a queue's services for its methods."""
        for key, value in kw.items():
            setattr(self, key, value)

    def __repr__(self) -> str:
        return f"<Job id={self.id} {self.queue}.{self.method} attempt={self.attempt}>"
