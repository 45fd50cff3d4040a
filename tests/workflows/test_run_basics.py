"""End to end: a run goes from start to its terminal state on real workers."""

from __future__ import annotations

from workflows import RunStates, Step, Workflow

from .steps import StepQueue


def diamond() -> Workflow:
    return Workflow(
        "diamond",
        [
            Step("a", "steps", "run"),
            Step("b", "steps", "run", after=("a",)),
            Step("c", "steps", "run", after=("a",)),
            Step("d", "steps", "run", after=("b", "c")),
        ],
    )


def test_diamond_completes_in_order(wf_session, workers):
    queue = StepQueue()
    with workers({"steps": queue}):
        with wf_session() as wf:
            run_id = wf.start(diamond(), args={"x": 1})
        with wf_session() as wf:
            status = wf.wait_for_run(run_id, timeout=30)
    assert status.state == RunStates.COMPLETED
    assert status.states == {"a": "completed", "b": "completed", "c": "completed", "d": "completed"}
    order = queue.steps_run(run_id)
    assert order[0] == "a" and order[-1] == "d"
    assert status.result == {
        "d": {"step": "d", "upstream": {"b": status.step("b").result, "c": status.step("c").result}}
    }
    assert all(s.attempts == 1 and s.start_time and s.end_time for s in status.steps)


def test_failure_skips_dependents_and_fails_run(wf_session, workers):
    wf_def = Workflow(
        "failing",
        [
            Step("a", "steps", "run", args={"fail": True}),
            Step("b", "steps", "run", after=("a",)),
            Step("c", "steps", "run", after=("b",)),
            Step("cleanup", "steps", "run", after=("c",), trigger_rule="all_done"),
        ],
    )
    queue = StepQueue()
    with workers({"steps": queue}):
        with wf_session() as wf:
            run_id = wf.start(wf_def)
        with wf_session() as wf:
            status = wf.wait_for_run(run_id, timeout=30)
    assert status.state == RunStates.FAILED
    assert status.states == {"a": "failed", "b": "skipped", "c": "skipped", "cleanup": "completed"}
    assert status.step("a").error == {"failed": "a"}
