"""Benchmarks of the workflow layer; prints three figures as a table.

    python3 bench/workflows_bench.py                      # embedded PostgreSQL (pgserver)
    python3 bench/workflows_bench.py --database-url postgresql://postgres@127.0.0.1:5432/postgres
    python3 bench/workflows_bench.py --chain 50 --fan 200 --scale 200 2000 --repeats 1   # smoke run

1. Edge latency: over a chain of ``--chain`` no-op steps, the time from a
   step's job ending to its dependent's job starting (database clock), p50/p95.
2. Overhead: a DAG of ``--fan`` steps (1 root -> fan-2 -> 1 sink) against the
   same number of no-op jobs called directly, same workers, same process: the
   ratio of wall times (start to last job done).
3. Scale: the same shape at ``--scale`` sizes; the total time spent in
   coordinator jobs, and its ratio. A ratio equal to the size ratio (10x for
   1 000 -> 10 000) is linear growth; quadratic would be the square (100x).

Each figure is the median over ``--repeats`` (scale: one repeat per size, the
big one is slow). Everything runs in a schema of its own, dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from psycopg2_mq import MQSource, MQWorker, make_default_model  # noqa: E402
from workflows import Step, Workflow, WorkflowCoordinator, WorkflowSource, make_workflow_model  # noqa: E402

QUEUE = "wfbench"


class NoOp:
    def execute_job(self, job: Any) -> None:
        return None


class Bench:
    """Tables in a fresh schema, and one worker (threads) running steps and coordinators."""

    def __init__(self, url: sa.URL, threads: int) -> None:
        self.schema = f"wf_bench_{uuid.uuid4().hex[:8]}"
        self.engine = sa.create_engine(url, pool_size=5, max_overflow=10)
        with self.engine.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{self.schema}"')
        metadata = sa.MetaData(schema=self.schema)
        self.model = make_default_model(metadata)
        self.wf_model = make_workflow_model(metadata)
        metadata.create_all(self.engine)
        self.threads = threads
        self.coordinator = WorkflowCoordinator(
            engine=self.engine, model=self.model, workflow_model=self.wf_model
        )

    @contextmanager
    def workers(self) -> Iterator[list[MQWorker]]:
        """A worker for the steps (``threads``) and one for the coordinator (1 thread).

        The coordinator has a worker of its own, as docs/workflows.md advises:
        a coordinator that waits behind a backlog of step jobs lets the step
        completions pile up on its pending job, which the queue's on_finish
        trigger handles in O(pile) per completion.
        """
        workers = [
            MQWorker(engine=self.engine, model=self.model, queues={QUEUE: NoOp()}, threads=self.threads),
            MQWorker(engine=self.engine, model=self.model, queues={"workflows": self.coordinator}, threads=1),
        ]
        threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
        for thread in threads:
            thread.start()
        for worker in workers:
            while worker.get_status()["worker_id"] is None:
                time.sleep(0.01)
        try:
            yield workers
        finally:
            for worker in workers:
                worker.shutdown_gracefully()
            for thread in threads:
                thread.join(60)

    def close(self) -> None:
        with self.engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{self.schema}" CASCADE')
        self.engine.dispose()

    def run_workflow(self, workflow: Workflow) -> tuple[int, float]:
        """Start a run, wait for it; returns (run id, wall seconds)."""
        began = time.perf_counter()
        with Session(self.engine) as session, session.begin():
            run_id = self.source(session).start(workflow)
        with Session(self.engine) as session:
            status = self.source(session).wait_for_run(run_id, timeout=1800)
        wall = time.perf_counter() - began
        if status.state != "completed":
            raise RuntimeError(f"run {run_id} ended {status.state}")
        return run_id, wall

    def source(self, session: Session) -> WorkflowSource:
        return WorkflowSource(dbsession=session, model=self.model, workflow_model=self.wf_model)

    def direct_jobs(self, count: int) -> float:
        """``count`` no-op jobs called directly; wall seconds until all are done."""
        job = self.model.job_table
        began = time.perf_counter()
        with Session(self.engine) as session, session.begin():
            ids = MQSource(dbsession=session, model=self.model).call_many([(QUEUE, "noop", {})] * count)
        low, high = min(ids), max(ids)
        query = sa.select(sa.func.count()).where(job.c.id.between(low, high), job.c.state == "completed")
        with self.engine.connect() as conn:
            # the baseline has no completion signal of its own: a 5 ms poll (< 1% of its wall time)
            while conn.execute(query).scalar_one() < count:
                conn.commit()
                time.sleep(0.005)
        return time.perf_counter() - began

    def job_times(self, run_id: int) -> dict[str, Any]:
        job = self.model.job_table
        with Session(self.engine) as session:
            steps = session.execute(
                sa.select(job.c.trace["workflow"]["step"].astext, job.c.start_time, job.c.end_time).where(
                    job.c.queue == QUEUE, job.c.trace["workflow"]["run_id"].astext == str(run_id)
                )
            ).all()
            coordinator = session.execute(
                sa.select(sa.func.sum(job.c.end_time - job.c.start_time), sa.func.count()).where(
                    job.c.queue == "workflows", job.c.args["run_id"].astext == str(run_id)
                )
            ).one()
        return {
            "steps": {name: (start, end) for name, start, end in steps},
            "coordinator_seconds": coordinator[0].total_seconds() if coordinator[0] else 0.0,
            "coordinator_jobs": coordinator[1],
        }


def chain(n: int) -> Workflow:
    wf = Workflow(f"chain-{n}")
    previous = None
    for i in range(n):
        previous = wf.step(
            f"s{i:05d}", queue=QUEUE, method="noop", after=() if previous is None else previous
        )
    return wf


def fan(n: int) -> Workflow:
    """1 root -> n-2 parallel steps -> 1 sink: n steps in all."""
    middle = [Step(f"m{i:05d}", QUEUE, "noop", after=("root",)) for i in range(n - 2)]
    return Workflow(
        f"fan-{n}",
        [
            Step("root", QUEUE, "noop"),
            *middle,
            Step("sink", QUEUE, "noop", after=tuple(s.name for s in middle)),
        ],
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def edge_latency(bench: Bench, n: int, repeats: int) -> tuple[float, float]:
    p50s, p95s = [], []
    workflow = chain(n)
    for _ in range(repeats):
        run_id, _ = bench.run_workflow(workflow)
        times = bench.job_times(run_id)["steps"]
        names = sorted(times)
        gaps = [(times[b][0] - times[a][1]).total_seconds() for a, b in zip(names, names[1:], strict=False)]
        p50s.append(percentile(gaps, 0.50))
        p95s.append(percentile(gaps, 0.95))
    return statistics.median(p50s), statistics.median(p95s)


def overhead(bench: Bench, n: int, repeats: int) -> tuple[float, float, float]:
    dag_walls, direct_walls = [], []
    workflow = fan(n)
    for _ in range(repeats):
        direct_walls.append(bench.direct_jobs(n))
        dag_walls.append(bench.run_workflow(workflow)[1])
    dag, direct = statistics.median(dag_walls), statistics.median(direct_walls)
    return dag, direct, dag / direct


def scale(bench: Bench, sizes: list[int]) -> list[tuple[int, float, int, float]]:
    out = []
    for n in sizes:
        run_id, wall = bench.run_workflow(fan(n))
        times = bench.job_times(run_id)
        out.append((n, times["coordinator_seconds"], times["coordinator_jobs"], wall))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", default=os.environ.get("MQ_DATABASE_URL"))
    parser.add_argument("--threads", type=int, default=2, help="worker threads (default 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chain", type=int, default=200, help="steps in the latency chain")
    parser.add_argument("--fan", type=int, default=1000, help="steps in the overhead DAG")
    parser.add_argument("--scale", type=int, nargs=2, default=[1000, 10000], metavar=("SMALL", "BIG"))
    opts = parser.parse_args()

    server = None
    if opts.database_url:
        url = sa.make_url(opts.database_url)
    else:
        import pgserver

        server = pgserver.get_server(tempfile.mkdtemp(prefix="wf-bench-pg-"), cleanup_mode="stop")
        url = sa.make_url(server.get_uri())
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg2")

    bench = Bench(url, opts.threads)
    try:
        with bench.workers():
            bench.run_workflow(chain(5))  # warm-up: connections, caches
            p50, p95 = edge_latency(bench, opts.chain, opts.repeats)
            dag, direct, ratio = overhead(bench, opts.fan, opts.repeats)
            scaled = scale(bench, list(opts.scale))
    finally:
        bench.close()
        if server is not None:
            server.cleanup()

    (small, small_coord, small_jobs, small_wall), (big, big_coord, big_jobs, big_wall) = scaled
    rows = [
        (
            "edge latency p50",
            f"{p50 * 1000:.1f} ms",
            f"chain of {opts.chain} steps, job end -> next job start",
        ),
        ("edge latency p95", f"{p95 * 1000:.1f} ms", ""),
        ("overhead: DAG wall", f"{dag:.2f} s", f"1 -> {opts.fan - 2} -> 1 ({opts.fan} steps)"),
        ("overhead: direct wall", f"{direct:.2f} s", f"{opts.fan} no-op jobs called directly"),
        ("overhead ratio", f"{ratio:.2f}x", "DAG wall / direct wall"),
        (
            f"coordinator time @{small}",
            f"{small_coord:.2f} s",
            f"{small_jobs} coordinator jobs, run wall {small_wall:.1f} s",
        ),
        (
            f"coordinator time @{big}",
            f"{big_coord:.2f} s",
            f"{big_jobs} coordinator jobs, run wall {big_wall:.1f} s",
        ),
        (
            "coordinator time ratio",
            f"{big_coord / small_coord:.1f}x",
            f"size ratio {big / small:.0f}x: ~{big / small:.0f}x = linear, ~{(big / small) ** 2:.0f}x = quadratic",
        ),
    ]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    print(
        f"workflows benchmark: {opts.threads} step threads + 1 coordinator thread, median of {opts.repeats} (scale: 1 run per size)"
    )
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, width, strict=True)).rstrip())


if __name__ == "__main__":
    main()
