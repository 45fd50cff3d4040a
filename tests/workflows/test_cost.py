"""An advance costs O(changed steps), not O(run): counted in statements and rows, not seconds."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.orm import Session

from workflows import Step, Workflow


@contextmanager
def counting(engine: sa.Engine) -> Iterator[dict[str, int]]:
    """Counts the statements run on ``engine`` and the rows they returned or changed."""
    counts = {"statements": 0, "rows": 0}

    def after(conn, cursor, statement, parameters, context, executemany):
        counts["statements"] += 1
        counts["rows"] += max(cursor.rowcount, 0)

    sa.event.listen(engine, "after_cursor_execute", after)
    try:
        yield counts
    finally:
        sa.event.remove(engine, "after_cursor_execute", after)


def finish_pending_step_jobs(engine, model, run_id: int, limit: int | None = None) -> list[int]:
    """Complete pending step jobs of a run by hand, as a worker would; returns their ids."""
    job = model.Job
    with Session(engine) as session, session.begin():
        query = (
            sa.select(job.id)
            .where(
                job.queue == "steps",
                job.state == "pending",
                job.trace["workflow"]["run_id"].astext == str(run_id),
            )
            .order_by(job.id)
        )
        ids = list(session.scalars(query.limit(limit)))
        session.execute(sa.update(job).where(job.id.in_(ids)).values(state="running"))
        session.execute(sa.update(job).where(job.id.in_(ids)).values(state="completed", result={"ok": True}))
    return ids


def chain(n: int) -> Workflow:
    return Workflow(
        "chain", [Step(f"s{i}", "steps", "run", after=(f"s{i - 1}",) if i else ()) for i in range(n)]
    )


def fan(n: int) -> Workflow:
    middle = [Step(f"m{i}", "steps", "run", after=("root",)) for i in range(n)]
    return Workflow(
        "fan",
        [
            Step("root", "steps", "run"),
            *middle,
            Step("sink", "steps", "run", after=tuple(s.name for s in middle)),
        ],
    )


def advance_cost(
    engine, model, coordinator, wf_session, workflow, advances: int, per_advance: int = 1
) -> list[dict]:
    with wf_session() as wf:
        run_id = wf.start(workflow)
    costs = []
    for _ in range(advances):
        finished = finish_pending_step_jobs(engine, model, run_id, per_advance)
        with counting(engine) as counts:
            coordinator.advance(run_id, finished)
        costs.append(counts)
    return costs


def test_a_chain_advance_costs_the_same_in_a_short_and_a_long_chain(engine, model, coordinator, wf_session):
    short = advance_cost(engine, model, coordinator, wf_session, chain(6), advances=3)
    long = advance_cost(engine, model, coordinator, wf_session, chain(600), advances=3)
    assert [c["statements"] for c in short] == [c["statements"] for c in long]
    assert [c["rows"] for c in short] == [c["rows"] for c in long]
    # and few round trips: lock the run, take the finished jobs, read them with
    # their steps, count down, queue the next step, save (f7998ad cut 11 to 6)
    assert all(c["statements"] <= 6 for c in long), long


def test_fan_in_advances_do_not_read_the_whole_fan(engine, model, coordinator, wf_session):
    # after the root, each advance records one middle step: its cost must not grow with the fan's width
    narrow = advance_cost(engine, model, coordinator, wf_session, fan(10), advances=4)[1:]
    wide = advance_cost(engine, model, coordinator, wf_session, fan(500), advances=4)[1:]
    assert [c["statements"] for c in narrow] == [c["statements"] for c in wide]
    assert [c["rows"] for c in narrow] == [c["rows"] for c in wide]
