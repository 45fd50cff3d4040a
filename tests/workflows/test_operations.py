"""Operating runs: idempotent start, list, wait, cancel, retry_step, reconcile."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from psycopg2_mq import MQSource
from workflows import InvalidStepStateError, RunNotFoundError, RunStates, Step, Workflow

from ..support import wait_until
from .steps import StepQueue


def chain(*names: str, **step_args) -> Workflow:
    steps = []
    for i, name in enumerate(names):
        steps.append(
            Step(name, "steps", "run", args=step_args.get(name, {}), after=(names[i - 1],) if i else ())
        )
    return Workflow("chain", steps)


def test_idempotency_key_returns_the_existing_run(wf_session, engine, model):
    with wf_session() as wf:
        first = wf.start(chain("a", "b"), key="order-1")
        again = wf.start(chain("a", "b"), key="order-1")
    with wf_session() as wf:
        assert wf.start(chain("a", "b"), key="order-1") == first
        other = wf.start(chain("a", "b"), key="order-2")
        runs = wf.list_runs(workflow="chain")
    assert again == first and other != first
    assert [r.id for r in runs] == [other, first]
    with Session(engine) as session:
        roots = MQSource(dbsession=session, model=model).find_jobs(queue="steps")
    assert len(roots) == 2  # one root job per run, none for the repeated starts


def test_list_runs_filters_and_unknown_run(wf_session):
    with wf_session() as wf:
        run_id = wf.start(chain("a"))
        assert [r.id for r in wf.list_runs(state="running")] == [run_id]
        assert wf.list_runs(state=["completed"]) == []
        assert wf.list_runs(workflow="other") == []
        with pytest.raises(ValueError, match="unknown run states"):
            wf.list_runs(state="done")
        with pytest.raises(RunNotFoundError):
            wf.get_run(run_id + 1000)
        status = wf.get_run(run_id)
    assert status.states == {"a": "queued"} and status.state == "running"


def test_wait_for_run_times_out_then_returns(wf_session, workers):
    with wf_session() as wf:
        run_id = wf.start(chain("slow", slow={"sleep": 1.0}))
    with wf_session() as wf:
        began = time.monotonic()
        with pytest.raises(TimeoutError, match="still running"):
            wf.wait_for_run(run_id, timeout=0.3)
        assert 0.25 < time.monotonic() - began < 5
    with workers({"steps": StepQueue()}), wf_session() as wf:
        status = wf.wait_for_run(run_id, timeout=30)
    assert status.state == RunStates.COMPLETED


def test_cancel_run_lets_running_steps_finish_and_starts_nothing(wf_session, workers):
    # "waits" shares a cursor with "slow", so it is still pending while "slow" runs
    wf_def = Workflow(
        "cancel",
        [
            Step("slow", "steps", "run", args={"sleep": 1.0, "return": "done"}, cursor_key="entity:1"),
            Step("waits", "steps", "run", cursor_key="entity:1"),
            Step("after_slow", "steps", "run", after=("slow",)),
        ],
    )
    queue = StepQueue()
    with workers({"steps": queue}, threads=3):
        with wf_session() as wf:
            run_id = wf.start(wf_def)

        def slow_running():
            with wf_session() as wf:
                return wf.get_run(run_id).step("slow").state == "running"

        wait_until(slow_running)
        with wf_session() as wf:
            assert wf.cancel_run(run_id) is True
            assert wf.get_run(run_id).state == RunStates.CANCELING
        with wf_session() as wf:
            status = wf.wait_for_run(run_id, timeout=30)
            assert wf.cancel_run(run_id) is False
    assert status.state == RunStates.CANCELED
    assert status.states == {"slow": "completed", "waits": "canceled", "after_slow": "canceled"}
    assert queue.steps_run(run_id) == ["slow"]
    with wf_session() as wf, pytest.raises(InvalidStepStateError, match="canceled"):
        wf.retry_step(run_id, "waits")


def test_cancel_before_anything_ran_finishes_at_once(wf_session):
    with wf_session() as wf:
        run_id = wf.start(chain("a", "b"))
    with wf_session() as wf:
        assert wf.cancel_run(run_id)
    with wf_session() as wf:
        status = wf.wait_for_run(run_id, timeout=5)
    assert status.state == RunStates.CANCELED and set(status.states.values()) == {"canceled"}


def test_retry_step_reruns_it_and_lets_dependents_proceed(wf_session, workers):
    wf_def = Workflow(
        "retry",
        [
            Step("a", "steps", "run", args={"fail_attempts": 1, "return": "a"}),
            Step("b", "steps", "run", after=("a",)),
            Step("c", "steps", "run", after=("b",)),
            Step("on_fail", "steps", "run", after=("a",), trigger_rule="one_failed"),
        ],
    )
    queue = StepQueue()
    with workers({"steps": queue}):
        with wf_session() as wf:
            run_id = wf.start(wf_def)
        with wf_session() as wf:
            status = wf.wait_for_run(run_id, timeout=30)
        assert status.state == RunStates.FAILED
        assert status.states == {"a": "failed", "b": "skipped", "c": "skipped", "on_fail": "completed"}
        with wf_session() as wf, pytest.raises(InvalidStepStateError, match="not failed"):
            wf.retry_step(run_id, "on_fail")
        with wf_session() as wf:
            wf.retry_step(run_id, "a")
            assert wf.get_run(run_id).state == RunStates.RUNNING
        with wf_session() as wf:
            status = wf.wait_for_run(run_id, timeout=30)
    assert status.state == RunStates.COMPLETED
    assert status.states == {"a": "completed", "b": "completed", "c": "completed", "on_fail": "completed"}
    assert status.step("a").attempts == 2
    assert queue.steps_run(run_id).count("on_fail") == 1


def test_retry_a_mapped_step_reruns_only_failed_items(wf_session, workers):
    wf_def = Workflow(
        "map-retry",
        [
            Step("list", "steps", "run", args={"return": [1, 2, 3]}),
            Step(
                "each",
                "steps",
                "run",
                args={"fail_attempts": 1, "return_item": True},
                map_over="list",
                max_items=3,
            ),
        ],
    )
    queue = StepQueue()
    with workers({"steps": queue}):
        with wf_session() as wf:
            run_id = wf.start(wf_def)
        with wf_session() as wf:
            assert wf.wait_for_run(run_id, timeout=30).step("each").state == "failed"
            wf.retry_step(run_id, "each")
        with wf_session() as wf:
            status = wf.wait_for_run(run_id, timeout=30)
    assert status.state == RunStates.COMPLETED
    assert status.step("each").result == [{"item": 1}, {"item": 2}, {"item": 3}]
    assert sorted(queue.steps_run(run_id)).count("each[0]") == 2


def test_reconcile_recovers_an_advance_that_was_never_recorded(wf_session, workers, engine, model):
    with wf_session() as wf:
        run_id = wf.start(chain("a", "b"))
    # run the root job by hand and drop the coordinator call its completion queued,
    # as if that coordinator had been lost and then failed by an operator
    with Session(engine) as session, session.begin():
        job = model.Job
        session.execute(sa.update(job).where(job.queue == "steps").values(state="running"))
        session.execute(
            sa.update(job).where(job.queue == "steps").values(state="completed", result={"ok": 1})
        )
        session.execute(sa.delete(job).where(job.queue == "workflows"))
    with wf_session() as wf:
        assert wf.get_run(run_id).states == {"a": "queued", "b": "waiting"}
        wf.reconcile_run(run_id)
    with workers({"steps": StepQueue()}), wf_session() as wf:
        status = wf.wait_for_run(run_id, timeout=30)
    assert status.states == {"a": "completed", "b": "completed"}
    assert status.step("a").result == {"ok": 1}


def test_retry_step_can_rerun_finished_steps_downstream(wf_session, workers):
    wf_def = Workflow(
        "rerun",
        [
            Step("a", "steps", "run", args={"fail_attempts": 1, "return": "a"}),
            Step("report", "steps", "run", after=("a",), trigger_rule="all_done"),
            Step("publish", "steps", "run", after=("report",)),
        ],
    )
    queue = StepQueue()
    with workers({"steps": queue}):
        with wf_session() as wf:
            run_id = wf.start(wf_def)
        with wf_session() as wf:
            first = wf.wait_for_run(run_id, timeout=30)
            assert first.states == {"a": "failed", "report": "completed", "publish": "completed"}
            wf.retry_step(run_id, "a", rerun_downstream=True)
        with wf_session() as wf:
            status = wf.wait_for_run(run_id, timeout=30)
    assert status.state == RunStates.COMPLETED
    assert {s.name: s.attempts for s in status.steps} == {"a": 2, "report": 2, "publish": 2}
    reports = [r["context"] for r in queue.executions if r["step"] == "report"]
    assert [c.upstream["a"].state for c in reports] == ["failed", "completed"]


def test_retry_step_while_a_dependent_still_waits_on_another_step(wf_session, workers):
    # "join" waits on "slow" when "a" is retried: it must wait for a's re-run too
    wf_def = Workflow(
        "join",
        [
            Step("a", "steps", "run", args={"fail_attempts": 1, "retry_sleep": 1.0, "return": "a"}),
            Step("slow", "steps", "run", args={"sleep": 1.0}),
            Step("join", "steps", "run", after=("a", "slow"), trigger_rule="all_done"),
        ],
    )
    queue = StepQueue()
    with workers({"steps": queue}, threads=3):
        with wf_session() as wf:
            run_id = wf.start(wf_def)

        def a_failed():
            with wf_session() as wf:
                return wf.get_run(run_id).step("a").state == "failed"

        wait_until(a_failed)
        with wf_session() as wf:
            assert wf.get_run(run_id).step("join").state == "waiting"
            wf.retry_step(run_id, "a")
        with wf_session() as wf:
            status = wf.wait_for_run(run_id, timeout=30)
    assert status.states == {"a": "completed", "slow": "completed", "join": "completed"}
    (join,) = [r["context"] for r in queue.executions if r["step"] == "join"]
    assert join.upstream["a"].state == "completed"


def test_a_replayed_advance_changes_nothing(wf_session, engine, model, coordinator):
    with wf_session() as wf:
        run_id = wf.start(chain("a", "b"))
    job = model.Job
    with Session(engine) as session, session.begin():
        (a_job,) = session.scalars(sa.select(job.id).where(job.queue == "steps")).all()
        session.execute(sa.update(job).where(job.id == a_job).values(state="running"))
        session.execute(sa.update(job).where(job.id == a_job).values(state="completed", result={"ok": 1}))
    first = coordinator.advance(run_id, [a_job])
    again = coordinator.advance(run_id, [a_job])
    assert (first["changed"], first["enqueued"]) == (1, 1)
    assert (again["changed"], again["enqueued"]) == (0, 0)
    with Session(engine) as session:
        assert len(session.scalars(sa.select(job.id).where(job.queue == "steps")).all()) == 2
    with wf_session() as wf:
        assert wf.get_run(run_id).states == {"a": "completed", "b": "queued"}


def test_start_checks_its_args(wf_session):
    wf_def = Workflow("entity", [Step("a", "steps", "run", cursor_key="customer:{customer_id}")])
    with wf_session() as wf:
        with pytest.raises(TypeError, match="must be a dict"):
            wf.start(wf_def, args=[1])
        with pytest.raises(TypeError, match="must be JSON"):
            wf.start(wf_def, args={"x": object()})
        with pytest.raises(ValueError, match="needs run arg 'customer_id'"):
            wf.start(wf_def, args={})
        assert wf.list_runs() == []


def test_concurrent_starts_with_one_key_make_one_run(wf_session):
    import threading

    barrier = threading.Barrier(4)
    ids: list[int] = []

    def start() -> None:
        with wf_session() as wf:
            barrier.wait()
            ids.append(wf.start(chain("a", "b"), key="once"))

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(ids) == 4 and len(set(ids)) == 1
    with wf_session() as wf:
        assert len(wf.list_runs()) == 1


def test_cancel_a_run_while_map_items_are_pending(wf_session, workers):
    wf_def = Workflow(
        "cancel-map",
        [
            Step("list", "steps", "run", args={"return": list(range(6))}),
            # one cursor for all items: they run one at a time, the rest stay pending
            Step(
                "each",
                "steps",
                "run",
                args={"sleep": 0.3},
                map_over="list",
                max_items=10,
                cursor_key="one-by-one",
            ),
            Step("after", "steps", "run", after=("each",), trigger_rule="all_done"),
        ],
    )
    queue = StepQueue()
    with workers({"steps": queue}, threads=3):
        with wf_session() as wf:
            run_id = wf.start(wf_def)

        def an_item_runs():
            with wf_session() as wf:
                return any(s.state == "running" for s in wf.get_run(run_id).steps if s.parent == "each")

        wait_until(an_item_runs)
        with wf_session() as wf:
            assert wf.cancel_run(run_id)
        with wf_session() as wf:
            status = wf.wait_for_run(run_id, timeout=30)
    items = [s for s in status.steps if s.parent == "each"]
    assert status.state == RunStates.CANCELED
    assert status.states == {"list": "completed", "each": "canceled", "after": "canceled"}
    ran = [s for s in items if s.state == "completed"]
    assert 1 <= len(ran) < 6 and len(ran) + sum(s.state == "canceled" for s in items) == 6
    assert "after" not in queue.steps_run(run_id)


def test_reconcile_leaves_a_step_whose_lost_job_was_retried_in_flight(wf_session, engine, model, coordinator):
    with wf_session() as wf:
        run_id = wf.start(chain("a", "b"))
    job = model.Job
    with Session(engine) as session, session.begin():
        (lost,) = session.scalars(sa.select(job.id).where(job.queue == "steps")).all()
        session.execute(sa.update(job).where(job.id == lost).values(state="running"))
        session.execute(sa.update(job).where(job.id == lost).values(state="lost"))
    with Session(engine) as session, session.begin():
        copy = MQSource(dbsession=session, model=model).retry_job(lost).id
    # a reconcile while the copy is pending must not take the lost job's failure for the step's
    coordinator.advance(run_id, [], reconcile=True)
    with wf_session() as wf:
        assert wf.get_run(run_id).states == {"a": "queued", "b": "waiting"}
    with Session(engine) as session, session.begin():
        session.execute(sa.update(job).where(job.id == copy).values(state="running"))
        session.execute(sa.update(job).where(job.id == copy).values(state="completed", result="a"))
    coordinator.advance(run_id, [copy])
    with wf_session() as wf:
        status = wf.get_run(run_id)
    assert status.states == {"a": "completed", "b": "queued"}
    assert status.step("a").attempts == 2 and status.step("a").job_id == copy


def test_retry_step_reopens_a_finished_run(wf_session, engine, model, coordinator):
    # a failed run that runs again has no outcome until it finishes again
    with wf_session() as wf:
        run_id = wf.start(chain("a"))
    job = model.Job

    def finish_a(state: str, result) -> int:
        with Session(engine) as session, session.begin():
            job_id = session.scalars(
                sa.select(job.id).where(job.queue == "steps", job.state == "pending")
            ).one()
            session.execute(sa.update(job).where(job.id == job_id).values(state="running"))
            session.execute(sa.update(job).where(job.id == job_id).values(state=state, result=result))
        return job_id

    coordinator.advance(run_id, [finish_a("failed", {"error": "a"})])
    with wf_session() as wf:
        failed = wf.get_run(run_id)
        wf.retry_step(run_id, "a")
    assert failed.state == RunStates.FAILED and failed.result == {"a": {"error": "a"}}
    assert failed.finished_time is not None
    with wf_session() as wf:
        again = wf.get_run(run_id)
    assert (again.state, again.result, again.finished_time) == (RunStates.RUNNING, None, None)
    coordinator.advance(run_id, [finish_a("completed", {"ok": 2})])
    with wf_session() as wf:
        done = wf.get_run(run_id)
    assert done.state == RunStates.COMPLETED and done.result == {"a": {"ok": 2}}
    assert done.finished_time is not None
