"""Running a queue's jobs in child processes, so that timeouts are enforced.

A thread cannot be killed: a job running past its timeout is retried or failed
by the maintenance pass, but its thread goes on until the job returns (its
outcome is then discarded). ``RunInChildProcess`` runs each job in a child
process instead and kills it when the job's timeout is up, so the work really
stops. The cost is a process start per job: use it for jobs that may hang or
must not outlive their timeout, not for many small jobs.
"""

from __future__ import annotations

import multiprocessing
import traceback
from typing import Any

from .errors import FailedJobError, JobTimeoutError, RetryJob
from .job import Job

#: attributes of a Job that travel to the child (what ``extend`` adds does not)
_JOB_FIELDS = ("id", "queue", "method", "args", "cursor", "cursor_key", "trace", "attempt", "scheduled_time", "timeout")


class ChildJobError(Exception):
    """The job raised in its child process; carries the child's exception type and traceback."""

    def __init__(self, type_name: str, message: str, child_traceback: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.child_traceback = child_traceback


class RunInChildProcess:
    """A queue whose jobs run ``queue.execute_job(job)`` in a child process.

    ``queue`` must be picklable (an instance of a module-level class): it is
    sent to each child. The child is killed, and the job fails with
    ``JobTimeoutError`` (retried per its policy), once the job's timeout —
    the call's or the queue's ``policy`` — or else ``timeout`` here has passed.
    Results and cursor changes come back from the child; so do
    ``FailedJobError`` and ``RetryJob``. ``start_method`` is a multiprocessing
    start method ('spawn' is the safe default in a threaded worker).
    """

    def __init__(self, queue: Any, *, timeout: float | None = None, start_method: str = "spawn") -> None:
        if not callable(getattr(queue, "execute_job", None)):
            raise TypeError("RunInChildProcess needs a queue object with execute_job(job)")
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive")
        self.queue = queue
        self.timeout = timeout
        self.policy = getattr(queue, "policy", None)
        self._context = multiprocessing.get_context(start_method)

    def execute_job(self, job: Job) -> Any:
        timeout = job.timeout if job.timeout is not None else self.timeout
        receive, send = self._context.Pipe(duplex=False)
        fields = {name: getattr(job, name) for name in _JOB_FIELDS}
        child = self._context.Process(target=_run_in_child, args=(self.queue, fields, send), daemon=True)
        child.start()
        send.close()
        try:
            if not receive.poll(timeout):
                child.kill()
                raise JobTimeoutError(f"job {job.id} ran past its timeout of {timeout}s; its process was killed")
            try:
                kind, payload, cursor = receive.recv()
            except EOFError:
                raise ChildJobError("ChildProcessDied", f"exit code {child.exitcode}", "") from None
        finally:
            child.join(5)
            receive.close()
        if job.cursor_key is not None:
            job.cursor = cursor
        if kind == "completed":
            return payload
        if kind == "failed":
            raise FailedJobError(payload["result"], update_cursor=payload["update_cursor"])
        if kind == "retry":
            raise RetryJob(payload["delay"], payload["reason"])
        raise ChildJobError(payload["type"], payload["message"], payload["traceback"])


def _run_in_child(queue: Any, fields: dict[str, Any], send: Any) -> None:
    """The child's side: run the job and send back (kind, payload, cursor)."""
    job = Job(**fields)
    try:
        result = queue.execute_job(job)
        message: tuple[str, Any, Any] = ("completed", result, job.cursor)
    except FailedJobError as exc:
        message = ("failed", {"result": exc.result, "update_cursor": exc.update_cursor}, job.cursor)
    except RetryJob as exc:
        message = ("retry", {"delay": exc.delay, "reason": exc.reason}, job.cursor)
    except BaseException as exc:
        kind = type(exc)
        message = (
            "error",
            {
                "type": f"{kind.__module__}.{kind.__qualname__}",
                "message": str(exc),
                "traceback": "".join(traceback.format_exception(exc)),
            },
            job.cursor,
        )
    try:
        send.send(message)
    except Exception as exc:  # e.g. a result that cannot be pickled
        send.send(("error", {"type": type(exc).__qualname__, "message": str(exc), "traceback": ""}, job.cursor))
    finally:
        send.close()
