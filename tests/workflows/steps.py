"""A step queue for the workflow tests: its behaviour is in each step's args."""

from __future__ import annotations

import threading
import time
from typing import Any

from psycopg2_mq import FailedJobError
from workflows import context


class StepQueue:
    """Runs any method; the step's args say what to do.

    * ``{"fail": true}`` fails the job (``FailedJobError`` with ``{"failed": step}``);
    * ``{"fail_attempts": n}`` fails the first ``n`` attempts of the step;
    * ``{"return": value}`` returns ``value``; otherwise ``{"step": name, "upstream": results}``;
    * ``{"sleep": seconds}`` sleeps first; ``{"retry_sleep": seconds}`` on attempts after the first.

    Every execution is recorded with its context and monotonic start/end times.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.executions: list[dict[str, Any]] = []
        self.attempts: dict[tuple[int, str], int] = {}

    def execute_job(self, job: Any) -> Any:
        ctx = context(job)
        key = (ctx.run_id, ctx.step if ctx.index is None else f"{ctx.step}[{ctx.index}]")
        record = {
            "job_id": job.id,
            "run_id": ctx.run_id,
            "step": key[1],
            "context": ctx,
            "start": time.monotonic(),
        }
        with self.lock:
            self.attempts[key] = self.attempts.get(key, 0) + 1
            attempt = self.attempts[key]
        try:
            args = job.args or {}
            if args.get("sleep"):
                time.sleep(args["sleep"])
            if attempt > 1 and args.get("retry_sleep"):
                time.sleep(args["retry_sleep"])
            if args.get("fail") or attempt <= args.get("fail_attempts", 0):
                raise FailedJobError({"failed": key[1]})
            if "return" in args:
                return args["return"]
            if args.get("return_item"):
                return {"item": ctx.item}
            return {"step": key[1], "upstream": ctx.results}
        finally:
            record["end"] = time.monotonic()
            with self.lock:
                self.executions.append(record)

    def steps_run(self, run_id: int) -> list[str]:
        with self.lock:
            return [r["step"] for r in self.executions if r["run_id"] == run_id]
