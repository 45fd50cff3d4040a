"""Queues for the child-process tests; module-level so that they can be pickled."""

from __future__ import annotations

import os
import time
from typing import Any

from psycopg2_mq import FailedJobError


class ChildQueue:
    def execute_job(self, job: Any) -> Any:
        if job.method == "hang":
            with open(job.args["pid_file"], "w") as f:
                f.write(str(os.getpid()))
            time.sleep(600)
        if job.method == "count":
            job.cursor["n"] = job.cursor.get("n", 0) + 1
            return {"pid": os.getpid(), "n": job.cursor["n"]}
        if job.method == "refuse":
            raise FailedJobError({"refused": True})
        raise KeyError(job.method)
