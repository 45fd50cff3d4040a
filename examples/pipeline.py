"""A workflow: fetch a list, process each item in parallel, report on all of them.

    python3 examples/pipeline.py [DATABASE_URL] [--database-url URL] [--orders 5]

    fetch ──> price (one job per order, map) ──> report (fan-in, runs even if some failed)
      └─────> audit ─────────────────────────────┘

A worker (coordinator + steps) runs in this process; the run is started, waited
for (LISTEN/NOTIFY) and printed as a table and as Mermaid text. Order 3 is
"bad": its job raises, so ``price`` fails, ``report`` still runs (``all_done``)
and sees which item failed, and the run ends ``failed``; then
``retry_step("price", rerun_downstream=True)`` re-runs the failed item with the
problem fixed, and the report after it, and the run completes. Exit status 0
if it does. Without a URL (or ``MQ_DATABASE_URL``) it uses an embedded
PostgreSQL (``pip install 'psycopg2_mq[embedded]'``).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import sqlalchemy as sa
from sqlalchemy.orm import Session

import workflows
from psycopg2_mq import MQWorker, make_default_model
from psycopg2_mq.cli import database_url_or_embedded
from workflows import Workflow, WorkflowCoordinator, WorkflowSource, make_workflow_model

# -- the workflow, declared once at import time ----------------------------------------

pipeline = Workflow("price-orders")
fetch = pipeline.step("fetch", queue="shop", method="fetch_orders")
price = pipeline.step("price", queue="shop", method="price_order", map_over="fetch", max_items=100)
audit = pipeline.step("audit", queue="shop", method="audit", after=[fetch])
pipeline.step("report", queue="shop", method="report", after=[price, audit], trigger_rule="all_done")


class Shop:
    """The steps' code: one queue object, one method per step."""

    def __init__(self) -> None:
        self.fixed = threading.Event()

    def execute_job(self, job):
        ctx = workflows.context(job)
        if job.method == "fetch_orders":
            return [{"order": n, "qty": n % 3 + 1} for n in range(1, ctx.run_args["orders"] + 1)]
        if job.method == "price_order":
            if ctx.item["order"] == 3 and not self.fixed.is_set():
                raise ValueError("order 3: no price for this product")
            return {"order": ctx.item["order"], "total": ctx.item["qty"] * 9.5}
        if job.method == "audit":
            return {"orders_seen": len(ctx.result("fetch"))}
        if job.method == "report":
            priced = [r for r in ctx.result("price") if isinstance(r, dict) and "total" in r]
            return {
                "revenue": sum(r["total"] for r in priced),
                "priced": len(priced),
                "failed_steps": ctx.failed,
            }
        raise ValueError(f"unknown method {job.method}")


def run_pipeline(engine: sa.Engine, orders: int) -> int:
    metadata = sa.MetaData()
    model = make_default_model(metadata)
    wf_model = make_workflow_model(metadata)
    metadata.create_all(engine)  # only the missing tables

    shop = Shop()
    worker = MQWorker(
        engine=engine,
        model=model,
        queues={
            "workflows": WorkflowCoordinator(engine=engine, model=model, workflow_model=wf_model),
            "shop": shop,
        },
        threads=3,
    )
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()

    def source(session: Session) -> WorkflowSource:
        return WorkflowSource(dbsession=session, model=model, workflow_model=wf_model)

    try:
        started = time.monotonic()
        with Session(engine) as session, session.begin():
            run_id = source(session).start(pipeline, args={"orders": orders})
        with Session(engine) as session:
            status = source(session).wait_for_run(run_id, timeout=60)
        print(f"first attempt, {time.monotonic() - started:.2f}s:")
        print(workflows.to_text(status))

        shop.fixed.set()  # "deploy a fix", then re-run what failed
        with Session(engine) as session, session.begin():
            source(session).retry_step(run_id, "price", rerun_downstream=True)
        with Session(engine) as session:
            status = source(session).wait_for_run(run_id, timeout=60)
        print("after retry_step('price', rerun_downstream=True):")
        print(workflows.to_text(status))
        print(workflows.to_mermaid(status))
    finally:
        worker.shutdown_gracefully()
        thread.join(30)

    ok = status.state == "completed" and status.result["report"]["priced"] == orders
    print(f"run {run_id}: {status.state}, result {status.result}")
    print("OK" if ok else "FAILED: the run did not complete")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description="A fetch -> map -> fan-in workflow, run to completion.")
    parser.add_argument(
        "database_url", nargs="?", help="SQLAlchemy URL (default: $MQ_DATABASE_URL, else embedded)"
    )
    parser.add_argument("--database-url", dest="database_url_opt", help="same as the positional argument")
    parser.add_argument("--orders", type=int, default=5, help="orders to price (default: %(default)s)")
    args = parser.parse_args()
    with database_url_or_embedded(args.database_url_opt or args.database_url) as url:
        engine = sa.create_engine(url)
        try:
            return run_pipeline(engine, args.orders)
        finally:
            engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
