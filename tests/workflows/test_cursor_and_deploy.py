"""Per-entity serialization across runs, and runs that outlive a deploy."""

from __future__ import annotations

import threading
import time

from sqlalchemy.orm import Session

from psycopg2_mq import MQSource
from workflows import RunStates, Step, Workflow, context


class CustomerQueue:
    """Counts updates per customer in the cursor; records overlapping executions."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.intervals: dict[str, list[tuple[float, float]]] = {}

    def execute_job(self, job):
        start = time.monotonic()
        job.cursor["updates"] = job.cursor.get("updates", 0) + 1
        job.cursor.setdefault("runs", []).append(context(job).run_id)
        time.sleep(0.05)
        with self.lock:
            self.intervals.setdefault(job.cursor_key, []).append((start, time.monotonic()))
        return job.cursor["updates"]


def customer_workflow() -> Workflow:
    wf = Workflow("customer-sync")
    fetch = wf.step("fetch", queue="steps", method="fetch")
    wf.step("update", queue="customers", method="update", after=fetch, cursor_key="customer:{customer_id}")
    return wf


def test_steps_with_a_cursor_key_are_serialized_per_entity_across_runs(wf_session, workers, engine, model):
    from .steps import StepQueue

    customers = CustomerQueue()
    with workers({"steps": StepQueue(), "customers": customers}, threads=4):
        with wf_session() as wf:
            runs = [wf.start(customer_workflow(), args={"customer_id": c}) for c in (42, 42, 7, 42)]
        with wf_session() as wf:
            statuses = [wf.wait_for_run(r, timeout=30) for r in runs]
    assert {s.state for s in statuses} == {RunStates.COMPLETED}
    for intervals in customers.intervals.values():
        intervals.sort()
        assert all(a[1] <= b[0] for a, b in zip(intervals, intervals[1:], strict=False)), (
            "overlap on one customer"
        )
    with Session(engine) as session:
        mq = MQSource(dbsession=session, model=model)
        c42, c7 = mq.get_cursor("customer:42"), mq.get_cursor("customer:7")
    assert c42["updates"] == 3 and sorted(c42["runs"]) == sorted([runs[0], runs[1], runs[3]])
    assert c7 == {"updates": 1, "runs": [runs[2]]}
    # each update saw the count left by the previous run on the same customer
    assert sorted(s.step("update").result for s in statuses if s.args["customer_id"] == 42) == [1, 2, 3]


def test_a_run_follows_its_snapshot_after_the_code_changed(wf_session, workers):
    from .steps import StepQueue

    v1 = Workflow(
        "deploy", [Step("a", "steps", "run"), Step("b", "steps", "run", after=("a",), args={"return": "v1"})]
    )
    with wf_session() as wf:
        run_id = wf.start(v1)
    # the deploy: same workflow name, different steps, before the run advanced
    v2 = Workflow(
        "deploy",
        [
            Step("a", "steps", "run"),
            Step("b2", "steps", "run", after=("a",), args={"return": "v2"}),
            Step("b", "steps", "run", after=("b2",), args={"return": "v2"}),
        ],
    )
    queue = StepQueue()
    with workers({"steps": queue}):
        with wf_session() as wf:
            status = wf.wait_for_run(run_id, timeout=30)
            new_run = wf.start(v2)
        with wf_session() as wf:
            new_status = wf.wait_for_run(new_run, timeout=30)
    assert status.state == RunStates.COMPLETED
    assert status.states == {"a": "completed", "b": "completed"}
    assert status.result == {"b": "v1"}
    assert new_status.states == {"a": "completed", "b2": "completed", "b": "completed"}
    assert new_status.result == {"b": "v2"}
