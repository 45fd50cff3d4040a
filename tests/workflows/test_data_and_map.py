"""Data passing (context, fan-in of failures, run result) and dynamic fan-out."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from workflows import RunStates, Step, Workflow

from .steps import StepQueue


def run_to_end(wf_session, workers, workflow, args=None, queue=None, threads=2):
    queue = queue or StepQueue()
    with workers({"steps": queue}, threads=threads):
        with wf_session() as wf:
            run_id = wf.start(workflow, args=args or {})
        with wf_session() as wf:
            return wf.wait_for_run(run_id, timeout=30), queue


def test_context_and_fan_in_including_failures(wf_session, workers):
    wf_def = Workflow(
        "fan-in",
        [
            Step("ok", "steps", "run", args={"return": {"rows": 3}}),
            Step("bad", "steps", "run", args={"fail": True}),
            Step("collect", "steps", "run", after=("ok", "bad"), trigger_rule="all_done"),
        ],
    )
    status, queue = run_to_end(wf_session, workers, wf_def, args={"day": "2026-11-28"})
    (collect,) = [r for r in queue.executions if r["step"] == "collect"]
    ctx = collect["context"]
    assert ctx.run_id == status.id and ctx.workflow == "fan-in" and ctx.step == "collect"
    assert ctx.run_args == {"day": "2026-11-28"}
    assert ctx.upstream["ok"].state == "completed" and ctx.result("ok") == {"rows": 3}
    assert ctx.upstream["bad"].state == "failed" and ctx.result("bad") == {"failed": "bad"}
    assert ctx.results == {"ok": {"rows": 3}} and ctx.failed == ["bad"]
    # the run failed (a step failed) and its result is its sink's
    assert status.state == RunStates.FAILED
    assert status.result == {"collect": {"step": "collect", "upstream": {"ok": {"rows": 3}}}}


def test_step_args_stay_as_declared(wf_session, workers):
    wf_def = Workflow("args", [Step("a", "steps", "run", args={"return": "x", "limit": 5})])
    status, queue = run_to_end(wf_session, workers, wf_def)
    assert status.result == {"a": "x"}


def test_retries_from_the_definition(wf_session, workers):
    wf_def = Workflow("flaky", [Step("a", "steps", "run", args={"fail_attempts": 2, "return": 1}, retries=2)])
    status, _ = run_to_end(wf_session, workers, wf_def)
    assert status.state == RunStates.COMPLETED
    assert status.step("a").attempts == 3
    wf_def = Workflow(
        "flakier", [Step("a", "steps", "run", args={"fail_attempts": 5}, retries=1, retry_delay=0.05)]
    )
    status, _ = run_to_end(wf_session, workers, wf_def)
    assert status.state == RunStates.FAILED and status.step("a").attempts == 2


def mapping(items, max_items=5, each_args=None, report_rule="all_success") -> Workflow:
    return Workflow(
        "map",
        [
            Step("list", "steps", "run", args={"return": items}),
            Step(
                "each",
                "steps",
                "run",
                args=each_args or {"return_item": True},
                map_over="list",
                max_items=max_items,
            ),
            Step("report", "steps", "run", after=("each",), trigger_rule=report_rule),
        ],
    )


def test_map_runs_one_job_per_item_and_fans_in(wf_session, workers):
    status, queue = run_to_end(wf_session, workers, mapping(["a", "b", "c"]), threads=3)
    assert status.state == RunStates.COMPLETED
    assert status.step("each").result == [{"item": "a"}, {"item": "b"}, {"item": "c"}]
    assert [s.name for s in status.steps if s.parent == "each"] == ["each[0]", "each[1]", "each[2]"]
    (report,) = [r for r in queue.executions if r["step"] == "report"]
    assert report["context"].result("each") == [{"item": "a"}, {"item": "b"}, {"item": "c"}]
    items = sorted(
        (r["context"].index, r["context"].item) for r in queue.executions if r["step"].startswith("each[")
    )
    assert items == [(0, "a"), (1, "b"), (2, "c")]


def test_map_over_more_than_max_items_fails_the_step(wf_session, workers):
    status, queue = run_to_end(wf_session, workers, mapping(list(range(6)), max_items=5))
    assert status.state == RunStates.FAILED
    assert status.states == {"list": "completed", "each": "failed", "report": "skipped"}
    assert status.step("each").error["type"] == "MaxItemsExceeded"
    assert (
        "6 items" in status.step("each").error["message"]
        and "max_items=5" in status.step("each").error["message"]
    )
    assert not [r for r in queue.executions if r["step"].startswith("each")]


def test_map_over_empty_list_and_not_a_list(wf_session, workers):
    status, _ = run_to_end(wf_session, workers, mapping([]))
    assert status.states == {"list": "completed", "each": "completed", "report": "completed"}
    assert status.step("each").result == []
    status, _ = run_to_end(wf_session, workers, mapping({"not": "a list"}))
    assert status.step("each").error["type"] == "MapError"


def test_a_failed_item_fails_the_mapped_step(wf_session, workers):
    wf_def = Workflow(
        "map-fail",
        [
            Step("list", "steps", "run", args={"return": [1, 2]}),
            Step("each", "steps", "run", args={"fail": True}, map_over="list", max_items=5),
            Step("report", "steps", "run", after=("each",), trigger_rule="all_done"),
        ],
    )
    status, queue = run_to_end(wf_session, workers, wf_def)
    assert status.states == {"list": "completed", "each": "failed", "report": "completed"}
    (report,) = [r for r in queue.executions if r["step"] == "report"]
    assert report["context"].upstream["each"].state == "failed"
    assert report["context"].result("each") == [{"failed": "each[0]"}, {"failed": "each[1]"}]


def finish_by_hand(engine, model, outcomes: dict[str, tuple[str, object]]) -> list[int]:
    """Finish the pending step jobs named in ``outcomes`` ({step: (state, result)}), as a worker would."""
    job = model.Job
    step = job.trace["workflow"]
    name = sa.func.coalesce(step["item_step"].astext, step["step"].astext)
    with Session(engine) as session, session.begin():
        rows = session.execute(
            sa.select(job.id, name).where(job.queue == "steps", job.state == "pending", name.in_(outcomes))
        ).all()
        assert sorted(n for _, n in rows) == sorted(outcomes)
        for job_id, n in rows:
            state, result = outcomes[n]
            session.execute(sa.update(job).where(job.id == job_id).values(state="running"))
            session.execute(sa.update(job).where(job.id == job_id).values(state=state, result=result))
    return [job_id for job_id, _ in rows]


def step_rows(engine, workflow_model, run_id: int) -> dict[str, tuple]:
    step = workflow_model.step_table
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(step.c.name, step.c.state, step.c.items_left, step.c.attempts, step.c.result).where(
                step.c.run_id == run_id
            )
        ).all()
    return {r.name: tuple(r[1:]) for r in rows}


def test_one_advance_retries_an_item_and_counts_down_its_mapped_step(
    engine, model, workflow_model, coordinator, wf_session
):
    # one advance records a failed item (retried: its mapped step's row is read
    # for the retry) and a completed one (counting down that row in memory)
    wf_def = Workflow(
        "map-retry",
        [
            Step("list", "steps", "run"),
            Step("each", "steps", "run", map_over="list", max_items=5, retries=1),
            Step("report", "steps", "run", after=("each",)),
        ],
    )
    with wf_session() as wf:
        run_id = wf.start(wf_def)
    coordinator.advance(run_id, finish_by_hand(engine, model, {"list": ("completed", ["x", "y", "z"])}))
    outcomes = {"each[0]": ("failed", {"error": "boom"}), "each[1]": ("completed", "y!")}
    summary = coordinator.advance(run_id, finish_by_hand(engine, model, outcomes))
    assert (summary["changed"], summary["enqueued"]) == (2, 1)
    rows = step_rows(engine, workflow_model, run_id)
    assert rows["each"] == ("queued", 2, 1, None)
    assert rows["each[0]"] == ("queued", None, 2, None)
    assert rows["each[1]"] == ("completed", None, 1, "y!")
    coordinator.advance(
        run_id,
        finish_by_hand(engine, model, {"each[0]": ("completed", "x!"), "each[2]": ("completed", "z!")}),
    )
    with wf_session() as wf:
        status = wf.get_run(run_id)
    assert status.states == {"list": "completed", "each": "completed", "report": "queued"}
    assert status.step("each").result == ["x!", "y!", "z!"]
    job = model.Job
    with Session(engine) as session:
        (trace,) = session.scalars(
            sa.select(job.trace).where(job.trace["workflow"]["step"].astext == "report")
        )
    assert trace["workflow"]["upstream"] == {"each": {"state": "completed", "result": ["x!", "y!", "z!"]}}


def test_a_fan_in_sees_results_recorded_now_and_before(engine, model, coordinator, wf_session):
    # "join" is decided by the advance that records "b": b's outcome is in that
    # advance's memory, a's was stored by an earlier advance
    wf_def = Workflow(
        "join",
        [
            Step("a", "steps", "run"),
            Step("b", "steps", "run"),
            Step("join", "steps", "run", after=("a", "b"), trigger_rule="all_done"),
        ],
    )
    with wf_session() as wf:
        run_id = wf.start(wf_def)
    coordinator.advance(run_id, finish_by_hand(engine, model, {"a": ("completed", {"rows": 1})}))
    coordinator.advance(run_id, finish_by_hand(engine, model, {"b": ("failed", {"error": "b"})}))
    job = model.Job
    with Session(engine) as session:
        (trace,) = session.scalars(sa.select(job.trace).where(job.trace["workflow"]["step"].astext == "join"))
    assert trace["workflow"]["upstream"] == {
        "a": {"state": "completed", "result": {"rows": 1}},
        "b": {"state": "failed", "result": {"error": "b"}},
    }
