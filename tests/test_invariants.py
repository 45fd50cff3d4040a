"""Property-based (hypothesis) checks of the queue's invariants, on the real database.

Two tests:

* ``test_queue_state_machine``: a ``RuleBasedStateMachine`` drives arbitrary
  interleavings of ``MQSource.call`` / ``call_many`` (in committed or rolled back
  transactions), ``cancel_job``, claims and completions. Claims and completions
  run the worker's own code (``_claim.claim_jobs``, ``Queries.finish_job`` and
  ``finish_jobs``) for worker ids registered with ``_liveness.register_worker``
  on dedicated autocommit connections, exactly as ``MQWorker`` does, so the
  test decides when each claim and each completion happens. A Python model of the expected state is compared
  with the database after every step, and at teardown everything still pending
  is drained and every job must have ended exactly once.
* ``test_real_workers_on_generated_batches``: real ``MQWorker`` threads run
  generated batches of calls; executions are recorded inside ``execute_job``.

Run with ``HYPOTHESIS_PROFILE=ci`` for the bounded profile (see conftest.py).
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar

import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy.orm import Session

from psycopg2_mq import JobStates, MQSource
from psycopg2_mq import _liveness as liveness
from psycopg2_mq._claim import claim_jobs
from psycopg2_mq._queries import Queries

from .support import running_worker, wait_until

QUEUES = ("qa", "qb")
KEYS = ("k1", "k2", "k3")
#: the workers the machine claims for, and the queues each one serves
WORKERS = {"wa": ("qa",), "wab": ("qa", "qb")}
#: longest a future ``when`` lies ahead (seconds); keeps waits short
MAX_AHEAD = 0.2
#: ``when`` as (form, seconds from the database's now); None means no ``when``
WHENS = st.sampled_from(
    [
        None,
        None,
        ("delta", -30.0),
        ("delta", -0.5),
        ("delta", 0.0),
        ("delta", 0.05),
        ("delta", MAX_AHEAD),
        ("aware", -2.0),
        ("aware", 0.1),
        ("naive", -1.0),
        ("naive", 0.15),
    ]
)


@dataclass(frozen=True)
class CallSpec:
    queue: str
    cursor_key: str | None
    collapse: bool
    when: tuple[str, float] | None
    #: call_many only: pass a (queue, method, args) tuple instead of a dict
    as_tuple: bool = False


@st.composite
def call_specs(draw: Any) -> CallSpec:
    key = draw(st.sampled_from((None, *KEYS)))
    collapse = True if key is None else draw(st.booleans())
    when = draw(WHENS)
    as_tuple = key is None and when is None and draw(st.booleans())
    return CallSpec(draw(st.sampled_from(QUEUES)), key, collapse, when, as_tuple)


@dataclass
class ExpectedJob:
    id: int
    queue: str
    cursor_key: str | None
    collapsible: bool
    state: str = JobStates.PENDING
    scheduled_time: datetime | None = None


#: picks one of the current jobs by index; drawing an int (not sampled_from over the
#: current jobs) keeps data generation independent of timing-dependent state
PICK = st.integers(min_value=0, max_value=1 << 16)


def _pick(ids: Any, pick: int) -> int:
    ordered = sorted(ids)
    return ordered[pick % len(ordered)]


def _step(method: Callable[..., None]) -> Callable[..., None]:
    """Mark the machine broken when a step fails, so that teardown does not pile
    a second (consequential) failure onto the first."""

    @functools.wraps(method)
    def wrapper(self: QueueMachine, *args: Any, **kwargs: Any) -> None:
        try:
            method(self, *args, **kwargs)
        except BaseException:
            self.broken = True
            raise

    return wrapper


def _detached_connection(engine: sa.Engine) -> Any:
    """An autocommit psycopg2 connection of our own, as the worker makes them."""
    proxied = engine.raw_connection()
    conn = proxied.driver_connection
    proxied.detach()
    conn.autocommit = True
    return conn


def _truncate(engine: sa.Engine, model: Any) -> None:
    names = ", ".join(t.fullname for t in model.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"TRUNCATE {names}")


class QueueMachine(RuleBasedStateMachine):
    """Arbitrary interleavings of calls, cancels, claims and completions."""

    #: set by the test function before the machine runs (fixtures can't be passed in)
    engine: ClassVar[sa.Engine | None] = None
    model: ClassVar[Any] = None

    def __init__(self) -> None:
        super().__init__()
        assert self.engine is not None and self.model is not None
        _truncate(self.engine, self.model)
        self.queries = Queries.for_model(self.model)
        self.jobs: dict[int, ExpectedJob] = {}
        self.cursors: dict[str, dict[str, Any]] = {}
        #: job id -> (worker name, attempt, cursor handed over by the claim)
        self.running: dict[int, tuple[str, int, dict[str, Any] | None]] = {}
        self.claims: Counter[int] = Counter()
        self.finishes: Counter[int] = Counter()
        self.counter = 0
        self.broken = False
        self.workers: dict[str, tuple[Any, int]] = {}
        self.conns: list[Any] = []
        try:
            for name, queues in WORKERS.items():
                conn = _detached_connection(self.engine)
                self.conns.append(conn)
                worker_id = liveness.register_worker(
                    conn, self.queries, self.model.lock_class, f"machine-{name}", queues
                )
                self.workers[name] = (conn, worker_id)
            #: the executor side: finishes run on a connection of their own
            self.finisher = _detached_connection(self.engine)
            self.conns.append(self.finisher)
        except BaseException:
            self._close()
            raise

    # -- helpers -------------------------------------------------------------------

    def _close(self) -> None:
        for conn, worker_id in self.workers.values():
            if not conn.closed:
                liveness.unregister_worker(conn, self.queries, self.model.lock_class, worker_id)
        for conn in self.conns:
            conn.close()
        self.conns = []
        self.workers = {}

    def _db_now(self) -> datetime:
        with self.finisher.cursor() as cur:
            cur.execute("SELECT clock_timestamp()")
            return cur.fetchone()[0]

    def _when(self, when: tuple[str, float] | None) -> Any:
        if when is None:
            return None
        form, seconds = when
        if form == "delta":
            return timedelta(seconds=seconds)
        at = self._db_now() + timedelta(seconds=seconds)
        if form == "aware":
            return at
        return at.astimezone(timezone.utc).replace(tzinfo=None)  # naive: read as UTC

    def _args(self) -> dict[str, Any]:
        self.counter += 1
        return {"i": self.counter}

    def _pending_collapsible(self, key: str) -> ExpectedJob | None:
        found = [
            j
            for j in self.jobs.values()
            if j.cursor_key == key and j.collapsible and j.state == JobStates.PENDING
        ]
        assert len(found) <= 1, f"model has two pending collapsible jobs on {key}: {found}"
        return found[0] if found else None

    def _holding(self, key: str) -> list[ExpectedJob]:
        return [j for j in self.jobs.values() if j.cursor_key == key and j.state in JobStates.HOLDING_CURSOR]

    def _apply_calls(self, specs: list[CallSpec], ids: list[int], batch: dict[int, ExpectedJob]) -> None:
        """Check the ids returned for ``specs`` against the model; new jobs go to ``batch``."""
        assert len(ids) == len(specs)
        for spec, job_id in zip(specs, ids, strict=True):
            target = None
            if spec.cursor_key is not None and spec.collapse:
                pending = [
                    j
                    for j in (*self.jobs.values(), *batch.values())
                    if j.cursor_key == spec.cursor_key and j.collapsible and j.state == JobStates.PENDING
                ]
                assert len(pending) <= 1
                target = pending[0] if pending else None
            if target is not None:
                assert job_id == target.id, (
                    f"call on {spec.cursor_key} should collapse onto pending job {target.id}, got {job_id}"
                )
                continue
            assert job_id not in self.jobs and job_id not in batch, (
                f"job id {job_id} returned for a new job twice"
            )
            batch[job_id] = ExpectedJob(job_id, spec.queue, spec.cursor_key, spec.collapse)

    def _outcome(self, job_id: int, state: str) -> tuple[int, dict[str, Any], dict[str, Any] | None]:
        """(attempt, result, cursor to save) for finishing a running job, as the executor builds them."""
        _worker, attempt, cursor = self.running[job_id]
        job = self.jobs[job_id]
        new_cursor = None
        if state == JobStates.COMPLETED and job.cursor_key is not None:
            assert cursor is not None
            new_cursor = {"last": job_id, "count": cursor.get("count", 0) + 1}
        result = (
            {"ok": job_id} if state == JobStates.COMPLETED else {"error": {"type": "Boom", "message": "x"}}
        )
        return attempt, result, new_cursor

    def _waiting_queues(self, job_ids: list[int]) -> set[str]:
        """Queues woken when these jobs finish: of the pending jobs on the cursors they free,
        and their own (a job inserted on the cursor meanwhile is not in the finish's snapshot)."""
        keys = {self.jobs[i].cursor_key for i in job_ids} - {None}
        own = {self.jobs[i].queue for i in job_ids if self.jobs[i].cursor_key is not None}
        return own | {j.queue for j in self.jobs.values() if j.cursor_key in keys and j.state == JobStates.PENDING}

    def _finished(self, job_id: int, state: str, new_cursor: dict[str, Any] | None) -> None:
        del self.running[job_id]
        job = self.jobs[job_id]
        job.state = state
        self.finishes[job_id] += 1
        if new_cursor is not None:
            self.cursors[job.cursor_key] = new_cursor

    def _finish(self, job_id: int, state: str) -> None:
        """One outcome with FINISH_JOB."""
        attempt, result, new_cursor = self._outcome(job_id, state)
        waiting = self._waiting_queues([job_id])
        with self.finisher.cursor() as cur:
            cur.execute(
                self.queries.finish_job,
                {
                    "id": job_id,
                    "attempt": attempt,
                    "state": state,
                    "result": json.dumps(result),
                    "cursor": None if new_cursor is None else json.dumps(new_cursor),
                },
            )
            done, saved, woken = cur.fetchone()
        assert (done, saved) == (1, 1 if new_cursor is not None else 0), (job_id, state, done, saved)
        # the next job waiting on the freed cursor is announced on its queue's channel
        assert woken == len(waiting), (job_id, woken, waiting)
        self._finished(job_id, state, new_cursor)

    def _finish_batch(self, outcomes: dict[int, str]) -> None:
        """Several outcomes in one FINISH_JOBS statement, as the executor's completer writes them."""
        items = []
        saved_cursors = {}
        for job_id, state in outcomes.items():
            attempt, result, new_cursor = self._outcome(job_id, state)
            item: dict[str, Any] = {"id": job_id, "attempt": attempt, "state": state, "result": result}
            if new_cursor is not None:
                item["cursor"] = new_cursor
            saved_cursors[job_id] = new_cursor
            items.append(item)
        waiting = self._waiting_queues(list(outcomes))
        with self.finisher.cursor() as cur:
            cur.execute(self.queries.finish_jobs, {"outcomes": json.dumps(items)})
            done, saved, woken = cur.fetchone()
        assert sorted(done) == sorted(outcomes), (done, outcomes)
        assert saved == sum(c is not None for c in saved_cursors.values())
        assert woken == len(waiting), (outcomes, woken, waiting)
        for job_id, state in outcomes.items():
            self._finished(job_id, state, saved_cursors[job_id])

    def _claim(self, worker: str, limit: int) -> list[int]:
        conn, worker_id = self.workers[worker]
        queues = WORKERS[worker]
        with conn.cursor() as cur:
            cur.execute("SELECT clock_timestamp()")
            before = cur.fetchone()[0]
        # as MQWorker._claim does (no queue policies)
        claimed = claim_jobs(
            conn,
            self.queries,
            lock_class=self.model.lock_class,
            worker_id=worker_id,
            queues=queues,
            limit=limit,
        )
        rows = [row[:9] for row in claimed]
        with conn.cursor() as cur:
            cur.execute("SELECT clock_timestamp()")
            after = cur.fetchone()[0]
        ids = [row[0] for row in rows]
        assert len(ids) <= limit
        assert len(set(ids)) == len(ids), f"a claim returned a job twice: {ids}"
        keys = [row[4] for row in rows if row[4] is not None]
        assert len(set(keys)) == len(keys), f"a claim returned two jobs of one cursor: {rows}"

        def heads_its_cursor(j: ExpectedJob) -> bool:
            # no pending job of its cursor, in any queue, comes before it
            return not any(
                o.cursor_key == j.cursor_key
                and o.state == JobStates.PENDING
                and (o.scheduled_time, o.id) < (j.scheduled_time, j.id)
                for o in self.jobs.values()
            )

        def claimable(j: ExpectedJob) -> bool:
            return (
                j.state == JobStates.PENDING
                and j.queue in queues
                and (j.cursor_key is None or (not self._holding(j.cursor_key) and heads_its_cursor(j)))
            )

        due = sorted(
            (j for j in self.jobs.values() if claimable(j) and j.scheduled_time <= before),
            key=lambda j: (j.scheduled_time, j.id),
        )
        if due:
            assert due[0].id in ids, f"claim by {worker} skipped the first due job {due[0]}; got {ids}"
        for job_id, queue, _method, _args, cursor_key, _trace, attempts, scheduled_time, cursor in rows:
            assert job_id in self.jobs, f"claimed unknown job {job_id}"
            job = self.jobs[job_id]
            assert job.state == JobStates.PENDING, f"claimed job {job_id} which is {job.state}"
            assert self.claims[job_id] == 0, f"job {job_id} claimed a second time"
            assert queue == job.queue and queue in queues, f"{worker} claimed job {job_id} of queue {queue}"
            assert cursor_key == job.cursor_key
            assert scheduled_time == job.scheduled_time
            assert scheduled_time <= after, f"job {job_id} claimed before its time {scheduled_time}"
            assert attempts == 1
            if cursor_key is None:
                assert cursor is None
            else:
                assert not self._holding(cursor_key), f"job {job_id} claimed while its cursor is held"
                assert cursor == self.cursors.get(cursor_key, {}), (
                    job_id,
                    cursor,
                    self.cursors.get(cursor_key),
                )
                # jobs of a cursor take their turn in (scheduled_time, id) order, across queues
                earlier = [
                    (j.id, j.queue, j.scheduled_time)
                    for j in self.jobs.values()
                    if j.cursor_key == cursor_key
                    and j.state == JobStates.PENDING
                    and (j.scheduled_time, j.id) < (scheduled_time, job_id)
                ]
                assert not earlier, (
                    f"job {job_id} ({queue}, {scheduled_time}) of cursor {cursor_key} claimed by {worker} "
                    f"before earlier job(s) {earlier}; claimed {rows}"
                )
        for job_id, *_rest, cursor in rows:
            self.jobs[job_id].state = JobStates.RUNNING
            self.claims[job_id] += 1
            self.running[job_id] = (worker, 1, cursor)
        return ids

    def _seconds_until_next_pending(self) -> float | None:
        with self.finisher.cursor() as cur:
            cur.execute(
                f"SELECT EXTRACT(EPOCH FROM min(scheduled_time) - clock_timestamp())::float8 "
                f"FROM {self.model.job_table.fullname} WHERE state = 'pending'"
            )
            return cur.fetchone()[0]

    # -- rules ---------------------------------------------------------------------

    @initialize()
    def start(self) -> None:
        # the tables were emptied in __init__; the workers are registered
        assert not self.jobs

    @rule(
        specs=st.lists(call_specs(), min_size=1, max_size=3),
        commit=st.sampled_from([True, True, True, False]),
    )
    @_step
    def call(self, specs: list[CallSpec], commit: bool) -> None:
        """``MQSource.call`` once or a few times in one transaction, committed or rolled back."""
        batch: dict[int, ExpectedJob] = {}
        with Session(self.engine) as session:
            source = MQSource(dbsession=session, model=self.model)
            ids = []
            for spec in specs:
                job = source.call(
                    spec.queue,
                    "m",
                    self._args(),
                    when=self._when(spec.when),
                    cursor_key=spec.cursor_key,
                    collapse_on_cursor=spec.collapse,
                )
                ids.append(job.id)
                self._apply_calls([spec], [job.id], batch)
            if commit:
                session.commit()
            else:
                session.rollback()
        if commit:
            self.jobs.update(batch)

    @rule(specs=st.lists(call_specs(), min_size=1, max_size=6))
    @_step
    def call_many(self, specs: list[CallSpec]) -> None:
        entries: list[Any] = []
        for spec in specs:
            if spec.as_tuple:
                entries.append((spec.queue, "m", self._args()))
            else:
                entries.append(
                    {
                        "queue": spec.queue,
                        "method": "m",
                        "args": self._args(),
                        "when": self._when(spec.when),
                        "cursor_key": spec.cursor_key,
                        "collapse_on_cursor": spec.collapse,
                    }
                )
        with Session(self.engine) as session, session.begin():
            ids = MQSource(dbsession=session, model=self.model).call_many(entries)
        batch: dict[int, ExpectedJob] = {}
        self._apply_calls(specs, ids, batch)
        self.jobs.update(batch)

    @rule(pick=PICK)
    @_step
    def cancel(self, pick: int) -> None:
        if not self.jobs:
            return
        job_id = _pick(self.jobs, pick)
        job = self.jobs[job_id]
        with Session(self.engine) as session, session.begin():
            canceled = MQSource(dbsession=session, model=self.model).cancel_job(job_id)
        assert canceled == (job.state == JobStates.PENDING), (job_id, job.state, canceled)
        if canceled:
            job.state = JobStates.CANCELED
            self.finishes[job_id] += 1

    @rule(worker=st.sampled_from(sorted(WORKERS)), limit=st.integers(1, 3))
    @_step
    def claim(self, worker: str, limit: int) -> None:
        self._claim(worker, limit)

    @rule(pick=PICK, state=st.sampled_from([JobStates.COMPLETED, JobStates.COMPLETED, JobStates.FAILED]))
    @_step
    def finish(self, pick: int, state: str) -> None:
        if not self.running:
            return
        job_id = _pick(self.running, pick)
        self._finish(job_id, state)

    @rule(
        picks=st.lists(PICK, min_size=2, max_size=4),
        states=st.lists(st.sampled_from([JobStates.COMPLETED, JobStates.FAILED]), min_size=4, max_size=4),
    )
    @_step
    def finish_batch(self, picks: list[int], states: list[str]) -> None:
        if not self.running:
            return
        chosen = {_pick(self.running, p) for p in picks}
        self._finish_batch({job_id: states[n] for n, job_id in enumerate(sorted(chosen))})

    @rule(pick=PICK, attempt=st.sampled_from([0, 1, 2]))
    @_step
    def stale_finish(self, pick: int, attempt: int) -> None:
        """A finish that is not this claim's (a finished job, or a wrong attempt) writes nothing."""
        candidates = sorted(i for i, j in self.jobs.items() if j.state != JobStates.PENDING)
        if not candidates:
            return
        job_id = _pick(candidates, pick)
        if job_id in self.running:
            attempt = 2  # the claim's attempt is 1
        with self.finisher.cursor() as cur:
            cur.execute(
                self.queries.finish_job,
                {
                    "id": job_id,
                    "attempt": attempt,
                    "state": JobStates.COMPLETED,
                    "result": json.dumps({"stale": True}),
                    "cursor": json.dumps({"stale": job_id}),
                },
            )
            assert cur.fetchone() == (0, 0, 0), f"stale finish of job {job_id} (attempt {attempt}) wrote"

    @rule()
    @_step
    def wait_for_next_due(self) -> None:
        """Let time pass until the earliest future job is due (bounded)."""
        ahead = self._seconds_until_next_pending()
        if ahead is not None and ahead > 0:
            time.sleep(min(ahead, MAX_AHEAD + 0.2) + 0.005)

    # -- invariants ----------------------------------------------------------------

    @invariant()
    @_step
    def database_matches_model(self) -> None:
        Job = self.model.Job
        with Session(self.engine) as session:
            rows = session.execute(
                sa.select(
                    Job.id,
                    Job.queue,
                    Job.state,
                    Job.cursor_key,
                    Job.collapsible,
                    Job.scheduled_time,
                    Job.start_time,
                    Job.end_time,
                    Job.attempts,
                )
            ).all()
            cursors = {
                key: properties
                for key, properties in session.execute(
                    sa.select(self.model.JobCursor.key, self.model.JobCursor.properties)
                )
            }
        assert {r.id for r in rows} == set(self.jobs), "job rows differ from the accepted calls"
        pending_collapsible: Counter[str] = Counter()
        holding: Counter[str] = Counter()
        for r in rows:
            job = self.jobs[r.id]
            assert (r.queue, r.cursor_key, r.collapsible) == (job.queue, job.cursor_key, job.collapsible), r
            assert r.state == job.state, f"job {r.id} is {r.state}, expected {job.state}"
            job.scheduled_time = r.scheduled_time
            if r.cursor_key is not None:
                if r.state == JobStates.PENDING and r.collapsible:
                    pending_collapsible[r.cursor_key] += 1
                if r.state in JobStates.HOLDING_CURSOR:
                    holding[r.cursor_key] += 1
            if r.start_time is not None:
                assert r.start_time >= r.scheduled_time, f"job {r.id} started before its time: {r}"
            expected_attempts = (
                1 if r.state in (JobStates.RUNNING, JobStates.COMPLETED, JobStates.FAILED) else 0
            )
            assert r.attempts == expected_attempts == self.claims[r.id], (r, self.claims[r.id])
            if r.state in JobStates.FINISHED:
                assert r.end_time is not None
                assert r.start_time is None or r.end_time >= r.start_time
                assert self.finishes[r.id] == 1
            else:
                assert self.finishes[r.id] == 0
        assert all(n <= 1 for n in pending_collapsible.values()), pending_collapsible
        assert all(n <= 1 for n in holding.values()), holding
        # a cursor holds what the last completed job of that cursor wrote; failures write nothing
        assert cursors == self.cursors

    # -- teardown ------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.workers and not self.broken:
                self._drain()
        finally:
            self._close()

    def _drain(self) -> None:
        for job_id in sorted(self.running):
            self._finish(job_id, JobStates.COMPLETED)
        deadline = time.monotonic() + 10 * (MAX_AHEAD + 1)
        while any(j.state == JobStates.PENDING for j in self.jobs.values()):
            assert time.monotonic() < deadline, "pending jobs could not be drained"
            claimed = self._claim("wab", 3)
            for job_id in claimed:
                self._finish(job_id, JobStates.COMPLETED)
            if not claimed:
                self.wait_for_next_due()
            self.database_matches_model()
        self.database_matches_model()
        for job_id, job in self.jobs.items():
            assert job.state in JobStates.FINISHED, job
            assert self.finishes[job_id] == 1, (job, self.finishes[job_id])
            assert self.claims[job_id] == (0 if job.state == JobStates.CANCELED else 1), job


def test_queue_state_machine(engine: sa.Engine, model: Any) -> None:
    QueueMachine.engine = engine
    QueueMachine.model = model
    try:
        run_state_machine_as_test(QueueMachine, settings=settings())
    finally:
        QueueMachine.engine = None
        QueueMachine.model = None


# -- real workers ------------------------------------------------------------------------


class TimedQueue:
    """Records (job id, cursor key, cursor n seen, start, end) around each execution."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.executions: list[tuple[int, str | None, int | None, float, float]] = []

    def execute_job(self, job: Any) -> Any:
        start = time.monotonic()
        seen = None
        if job.cursor is not None:
            seen = job.cursor.get("n", 0)
            job.cursor["n"] = seen + 1
        time.sleep((job.id % 4) * 0.002)
        end = time.monotonic()
        with self.lock:
            self.executions.append((job.id, job.cursor_key, seen, start, end))
        return {"ran": job.id}


real_call = st.tuples(
    st.sampled_from((None, "a", "b", "c")),  # cursor
    st.booleans(),  # collapse
    st.sampled_from([None, -1.0, 0.0, 0.05, 0.2, 0.5]),  # when, seconds from now
)


def test_real_workers_on_generated_batches(engine: sa.Engine, model: Any) -> None:
    queue = TimedQueue()
    example = Counter[str]()

    @settings()
    @given(batches=st.lists(st.lists(real_call, min_size=1, max_size=10), min_size=1, max_size=3))
    def check(batches: list[list[tuple[str | None, bool, float | None]]]) -> None:
        example["n"] += 1
        prefix = f"ex{example['n']}-"  # cursors of their own: earlier examples do not interfere
        ids: set[int] = set()
        for batch in batches:
            with Session(engine) as session, session.begin():
                source = MQSource(dbsession=session, model=model)
                for cursor, collapse, when in batch:
                    job = source.call(
                        "work",
                        "run",
                        {},
                        cursor_key=None if cursor is None else prefix + cursor,
                        collapse_on_cursor=collapse if cursor is not None else True,
                        when=None if when is None else timedelta(seconds=when),
                    )
                    ids.add(job.id)
        Job = model.Job

        def all_done() -> bool:
            with Session(engine) as session:
                states = session.scalars(sa.select(Job.state).where(Job.id.in_(ids))).all()
            return len(states) == len(ids) and all(s == JobStates.COMPLETED for s in states)

        wait_until(all_done)
        with queue.lock:
            executions = list(queue.executions)
        ran = Counter(e[0] for e in executions)
        assert all(n == 1 for n in ran.values()), (
            f"executed more than once: {[i for i, n in ran.items() if n > 1]}"
        )
        assert ids <= set(ran), f"never executed: {ids - set(ran)}"
        mine = [e for e in executions if e[0] in ids]
        by_cursor: dict[str, list[tuple[int, str | None, int | None, float, float]]] = {}
        for e in mine:
            if e[1] is not None:
                by_cursor.setdefault(e[1], []).append(e)
        for key, runs in by_cursor.items():
            runs.sort(key=lambda e: e[3])
            for prev, nxt in zip(runs, runs[1:], strict=False):
                assert nxt[3] >= prev[4], f"jobs {prev[0]} and {nxt[0]} overlapped on cursor {key}"
            # each job saw the cursor as the previous one left it
            assert [e[2] for e in runs] == list(range(len(runs))), (key, runs)
        with Session(engine) as session:
            rows = session.execute(
                sa.select(Job.id, Job.scheduled_time, Job.start_time, Job.attempts).where(Job.id.in_(ids))
            ).all()
            saved = {
                key: properties
                for key, properties in session.execute(
                    sa.select(model.JobCursor.key, model.JobCursor.properties).where(
                        model.JobCursor.key.startswith(prefix)
                    )
                )
            }
        for r in rows:
            assert r.start_time >= r.scheduled_time, f"job {r.id} started before its time"
            assert r.attempts == 1
        assert saved == {key: {"n": len(runs)} for key, runs in by_cursor.items()}

    with ExitStack() as stack:
        for i in range(2):
            stack.enter_context(running_worker(engine, model, {"work": queue}, name=f"gen-{i}", threads=2))
        check()


# -- a known bug, found by the state machine ----------------------------------------------


def test_claim_keeps_cursor_order_across_queues(engine: sa.Engine, model: Any) -> None:
    def job(queue: str, cursor_key: str | None, seconds_ago: float) -> dict[str, Any]:
        return {
            "queue": queue,
            "method": "m",
            "args": {},
            "cursor_key": cursor_key,
            "collapse_on_cursor": cursor_key is None,
            "when": timedelta(seconds=-seconds_ago),
        }

    with Session(engine) as session, session.begin():
        first_k1, plain, second_k1, early_k2, late_k2 = MQSource(dbsession=session, model=model).call_many(
            [
                job("qa", "k1", 40),
                job("qa", None, 39),
                job("qa", "k1", 38),
                job("qa", "k2", 30),
                job("qb", "k2", 10),
            ]
        )
    queries = Queries.for_model(model)
    conn = _detached_connection(engine)
    try:
        worker_id = liveness.register_worker(conn, queries, model.lock_class, "fifo", ["qa", "qb"])
        rows = claim_jobs(
            conn, queries, lock_class=model.lock_class, worker_id=worker_id, queues=["qa", "qb"], limit=3
        )
        claimed = [row[0] for row in rows]
        liveness.unregister_worker(conn, queries, model.lock_class, worker_id)
    finally:
        conn.close()
    assert first_k1 in claimed and plain in claimed
    assert second_k1 not in claimed  # one job per cursor: this part holds
    # k2's jobs take their turn: the one due for 30 s runs before the one due for 10 s
    assert late_k2 not in claimed, f"claimed {claimed}: job {late_k2} jumped ahead of {early_k2} on cursor k2"
