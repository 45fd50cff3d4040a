"""Property test: random DAGs, random trigger rules, random outcomes, real workers.

A pure-Python oracle (written independently of ``workflows.rules``) computes
every step's final state; each run must end with exactly those states, every
step job is called exactly once per attempt (steps may retry), no step starts
before its upstream jobs ended, and coordinator executions of one run never
overlap. Two runs of the DAG go at once, to interleave their coordinators.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.orm import Session

from workflows import TRIGGER_RULES, RunStates, Step, Workflow

from ..support import running_worker
from .steps import StepQueue

MAX_STEPS = 30


@st.composite
def dags(draw: Any) -> list[dict[str, Any]]:
    """Steps s0..sN-1; each depends on a few earlier ones (so it is acyclic by construction)."""
    n = draw(st.integers(1, MAX_STEPS))
    steps = []
    for i in range(n):
        deps = draw(st.sets(st.integers(0, i - 1), max_size=min(i, 4))) if i else set()
        steps.append(
            {
                "name": f"s{i}",
                "after": sorted(f"s{d}" for d in deps),
                "rule": draw(st.sampled_from(TRIGGER_RULES)),
                # flaky: fails its first attempt only
                "outcome": draw(st.sampled_from(["ok", "ok", "fail", "flaky"])),
                "retries": draw(st.integers(0, 1)),
            }
        )
    return steps


def oracle(steps: list[dict[str, Any]]) -> dict[str, str]:
    """Expected final states, straight from the rules table of docs/workflows.md."""
    final: dict[str, str] = {}
    for step in steps:
        ups = [final[d] for d in step["after"]]
        good = ups.count("completed")
        bad = ups.count("failed")
        rule = step["rule"]
        if not ups or rule in ("all_done", "always"):
            runs = True
        elif rule == "all_success":
            runs = good == len(ups)
        elif rule == "one_success":
            runs = good >= 1
        elif rule == "one_failed":
            runs = bad >= 1
        else:  # none_failed
            runs = bad == 0
        if not runs:
            final[step["name"]] = "skipped"
        elif step["outcome"] == "ok" or (step["outcome"] == "flaky" and step["retries"]):
            final[step["name"]] = "completed"
        else:
            final[step["name"]] = "failed"
    return final


def expected_attempts(step: dict[str, Any], state: str) -> int:
    if state == "skipped":
        return 0
    if step["outcome"] == "fail":
        return 1 + step["retries"]
    return 2 if step["outcome"] == "flaky" and step["retries"] else 1


def step_args(step: dict[str, Any]) -> dict[str, Any]:
    return {"fail": step["outcome"] == "fail", "fail_attempts": 1 if step["outcome"] == "flaky" else 0}


class RecordingCoordinator:
    """Wraps the coordinator to record when each of its executions ran, per run."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.lock = threading.Lock()
        self.intervals: dict[int, list[tuple[float, float]]] = {}

    def execute_job(self, job: Any) -> Any:
        start = time.monotonic()
        try:
            return self.inner.execute_job(job)
        finally:
            with self.lock:
                self.intervals.setdefault(job.args["run_id"], []).append((start, time.monotonic()))


@given(steps=dags(), threads=st.integers(2, 4))
def test_random_dag_runs_end_as_the_oracle_says(
    engine, model, workflow_model, coordinator, wf_session, steps, threads
):
    workflow = Workflow(
        "random",
        [
            Step(
                s["name"],
                "steps",
                "run",
                args=step_args(s),
                after=tuple(s["after"]),
                trigger_rule=s["rule"],
                retries=s["retries"],
            )
            for s in steps
        ],
    )
    expected = oracle(steps)
    recorder = RecordingCoordinator(coordinator)
    queue = StepQueue()
    with running_worker(engine, model, {"workflows": recorder, "steps": queue}, threads=threads):
        with wf_session() as wf:
            runs = [wf.start(workflow), wf.start(workflow)]
        with wf_session() as wf:
            statuses = [wf.wait_for_run(run_id, timeout=60) for run_id in runs]

    job = model.job_table
    for status in statuses:
        # exactly the oracle's states, and one terminal run state that agrees with them
        assert status.states == expected
        assert status.state == (RunStates.FAILED if "failed" in expected.values() else RunStates.COMPLETED)
        assert status.finished_time is not None

        with Session(engine) as session:
            jobs = session.execute(
                sa.select(
                    job.c.id, job.c.trace["workflow"]["step"].astext, job.c.start_time, job.c.end_time
                ).where(job.c.queue == "steps", job.c.trace["workflow"]["run_id"].astext == str(status.id))
            ).all()
        by_step: dict[str, list[Any]] = {}
        for row in jobs:
            by_step.setdefault(row[1], []).append(row)
        # every step job called exactly once per attempt (retries are attempts)
        for s in steps:
            attempts = expected_attempts(s, expected[s["name"]])
            assert len(by_step.get(s["name"], [])) == status.step(s["name"]).attempts == attempts, s
        # no step started before every upstream job it depends on had ended
        for s in steps:
            if s["name"] not in by_step:
                continue
            started = min(row.start_time for row in by_step[s["name"]])
            for dep in s["after"]:
                for upstream in by_step.get(dep, []):
                    assert upstream.end_time <= started, (s["name"], dep)
        assert sorted(queue.steps_run(status.id)) == sorted(
            name for name, rows in by_step.items() for _ in rows
        )

        # coordinators of one run never overlapped
        intervals = sorted(recorder.intervals.get(status.id, []))
        for (_, end), (start, _) in zip(intervals, intervals[1:], strict=False):
            assert end <= start
