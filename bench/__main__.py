"""``python3 -m bench``: every scenario, against our queue and the raw-SQL baseline.

    python3 -m bench --quick                 # smoke run, 40 s-2 min, embedded PostgreSQL
    python3 -m bench                         # full run, ~5-15 min on 2 cores (load-dependent)
    python3 -m bench --database-url postgresql://user@host/db   # or MQ_DATABASE_URL

Prints one table (median and min–max over ``--repeats``), then each target as
a same-run ratio with MET / NOT MET. Exits 1 if any check failed (a failed check
prints FAIL, never a number). Sizes are flags; see ``--help``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import raw, scenarios
from .harness import CheckFailed, Server, git_state, machine, median

REPO = str(Path(__file__).resolve().parent.parent)


@dataclass
class Sizes:
    """How big each scenario is; ``--quick`` and the full run differ only here."""

    repeats: int
    enqueue: int  # jobs per enqueue run
    drain: int  # jobs per drain run (ours and raw)
    latency: int  # probes per latency run (after 5 warm-ups)
    chain: int  # jobs on the one cursor
    table_small: int  # finished rows, small table
    table_big: int  # finished rows, big table
    table_drain: int  # jobs drained on top of the finished rows
    table_latency: int  # latency probes on top of the finished rows
    rss_marks: list[int] = field(default_factory=list)  # job counts at which the worker's RSS is read


QUICK = Sizes(
    repeats=1,
    enqueue=500,
    drain=2000,
    latency=60,
    chain=60,
    table_small=10_000,
    table_big=100_000,
    table_drain=2000,
    table_latency=40,
    rss_marks=[2_000, 20_000],
)
FULL = Sizes(
    repeats=3,
    enqueue=3000,
    drain=10_000,
    latency=200,
    chain=200,
    table_small=10_000,
    table_big=1_000_000,
    table_drain=5000,
    table_latency=100,
    rss_marks=[10_000, 50_000, 100_000, 200_000],
)

SCENARIOS = ["enqueue", "drain", "latency", "chain", "table", "rss"]


@dataclass
class Figure:
    """One row of the table: the values over repeats, or why it failed."""

    name: str
    system: str
    unit: str
    values: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.values) and not self.errors

    @property
    def median(self) -> float:
        return median(self.values)


class Results:
    def __init__(self) -> None:
        self.figures: dict[str, Figure] = {}

    def figure(self, key: str, name: str, system: str, unit: str) -> Figure:
        if key not in self.figures:
            self.figures[key] = Figure(name, system, unit)
        return self.figures[key]

    def get(self, key: str) -> Figure | None:
        return self.figures.get(key)

    def measure(self, keys: dict[str, tuple[str, str, str]], run: Callable[[], Any]) -> None:
        """Run once; a number goes to the one figure, a dict to a figure per entry.

        ``keys`` maps figure key -> (name, system, unit) and, for dict results,
        the key's last ``.part`` names the entry (``ours.latency.p50`` -> ``p50``).
        """
        figures = [self.figure(k, *v) for k, v in keys.items()]
        try:
            value = run()
        except CheckFailed as exc:
            self._fail(figures, str(exc))
            return
        except Exception as exc:  # a crash is a failed check too, and must be visible
            self._fail(figures, f"{type(exc).__name__}: {exc}")
            traceback.print_exc(file=sys.stderr)
            return
        if isinstance(value, dict):
            for key, fig in zip(keys, figures, strict=True):
                fig.values.append(float(value[key.rsplit(".", 1)[1]]))
        else:
            figures[0].values.append(float(value))

    @staticmethod
    def _fail(figures: list[Figure], message: str) -> None:
        print(f"    FAIL: {message}", file=sys.stderr)
        for fig in figures:
            fig.errors.append(message)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the scenarios, one repeat each ------------------------------------------------------------


def run_enqueue(server: Server, res: Results, sizes: Sizes) -> None:
    n = sizes.enqueue
    for key, name, setup, fn in [
        ("raw.enq1", "enqueue, 1 job per txn (INSERT+NOTIFY)", raw.setup, raw.enqueue_single),
        ("ours.enq1", "enqueue, 1 call() per txn", scenarios.setup, scenarios.enqueue_single),
        ("raw.enqbulk", "enqueue, multi-row INSERT x1000", raw.setup, raw.enqueue_multirow),
        ("ours.enqbulk", "enqueue, call_many() x1000", scenarios.setup, scenarios.enqueue_bulk),
    ]:
        system = key.split(".")[0]
        log(f"{name} ({system}, n={n})")
        url = server.fresh_db("enq")
        setup(url)
        res.measure({key: (name, system, "jobs/s")}, lambda fn=fn, url=url: fn(url, n))
        server.drop_db(url)


def run_drain(server: Server, res: Results, sizes: Sizes) -> None:
    n = sizes.drain
    cases: list[tuple[str, str, Callable[[Any], None], Callable[[Any], float]]] = [
        ("raw.drain.p1", "drain, 1 process, 1 job/txn", raw.setup, lambda u: raw.drain(u, n, 1, 1)),
        ("raw.drain.p4", "drain, 4 processes, 1 job/txn", raw.setup, lambda u: raw.drain(u, n, 4, 1)),
        ("raw.drain.p1b100", "drain, 1 process, 100 jobs/txn", raw.setup, lambda u: raw.drain(u, n, 1, 100)),
        (
            "raw.drain.p4b100",
            "drain, 4 processes, 100 jobs/txn",
            raw.setup,
            lambda u: raw.drain(u, n, 4, 100),
        ),
        ("ours.drain.t1", "drain, 1 process x 1 thread", scenarios.setup, lambda u: scenarios.drain(u, n, 1)),
        (
            "ours.drain.t4",
            "drain, 1 process x 4 threads",
            scenarios.setup,
            lambda u: scenarios.drain(u, n, 4),
        ),
        (
            "ours.drain.p4",
            "drain, 4 processes x 1 thread",
            scenarios.setup,
            lambda u: scenarios.drain(u, n, 1, processes=4),
        ),
    ]
    for key, name, setup, fn in cases:
        system = key.split(".")[0]
        log(f"{name} ({system}, n={n})")
        url = server.fresh_db("drain")
        setup(url)
        res.measure({key: (name, system, "jobs/s")}, lambda fn=fn, url=url: fn(url))
        server.drop_db(url)


def _latency_keys(prefix: str, name: str, system: str) -> dict[str, tuple[str, str, str]]:
    return {f"{prefix}.{p}": (f"{name} {p}", system, "ms") for p in ("p50", "p95", "p99")}


def run_latency(server: Server, res: Results, sizes: Sizes) -> None:
    n = sizes.latency
    log(f"pickup latency (raw, {n} probes)")
    url = server.fresh_db("lat")
    raw.setup(url)
    res.measure(_latency_keys("raw.lat", "pickup latency", "raw"), lambda: raw.pickup_latency(url, n))
    server.drop_db(url)
    log(f"pickup latency (ours, {n} probes)")
    url = server.fresh_db("lat")
    scenarios.setup(url)
    res.measure(_latency_keys("ours.lat", "pickup latency", "ours"), lambda: scenarios.pickup_latency(url, n))
    server.drop_db(url)


def run_chain(server: Server, res: Results, sizes: Sizes) -> None:
    n = sizes.chain
    log(f"cursor chain (ours, {n} jobs on one cursor, threads=4)")
    url = server.fresh_db("chain")
    scenarios.setup(url)
    res.measure(
        _latency_keys("ours.chain", "cursor chain end->next start", "ours"),
        lambda: scenarios.cursor_chain(url, n),
    )
    server.drop_db(url)


def run_table(server: Server, res: Results, sizes: Sizes, plans: dict[str, str]) -> None:
    for label, rows in (("small", sizes.table_small), ("big", sizes.table_big)):
        url = server.fresh_db("table")
        scenarios.setup(url)
        log(f"table size: filling {rows:,} finished rows")
        seconds = scenarios.fill_finished(url, rows)
        log(f"  filled in {seconds:.1f}s; pickup latency ({sizes.table_latency} probes)")
        res.measure(
            {
                f"ours.table.{label}.lat.p50": (f"pickup latency p50, {rows:,} finished rows", "ours", "ms"),
                f"ours.table.{label}.lat.p95": (f"pickup latency p95, {rows:,} finished rows", "ours", "ms"),
            },
            lambda url=url, rows=rows: scenarios.pickup_latency(
                url, sizes.table_latency, already_completed=rows
            ),
        )
        done = rows + sizes.table_latency + 5
        log(f"  drain {sizes.table_drain} jobs, 1 process x 4 threads")
        res.measure(
            {f"ours.table.{label}.drain": (f"drain 1x4 threads, {rows:,} finished rows", "ours", "jobs/s")},
            lambda url=url, done=done: scenarios.drain(url, sizes.table_drain, 4, already_completed=done),
        )
        try:
            plans[label] = scenarios.explain_claim(url)
        except Exception as exc:
            plans[label] = f"EXPLAIN failed: {exc}"
        server.drop_db(url)


def run_rss(server: Server, res: Results, sizes: Sizes) -> None:
    marks = sizes.rss_marks
    log(f"worker RSS over {max(marks):,} jobs (1 process x 4 threads)")
    url = server.fresh_db("rss")
    scenarios.setup(url)
    keys = {
        f"ours.rss.{m}": (f"worker RSS (VmRSS - RssShmem) after {m:,} jobs", "ours", "MiB") for m in marks
    }

    def run() -> dict[str, float]:
        rss = scenarios.worker_rss(url, marks)
        return {str(m): kib / 1024 for m, kib in rss.items()}

    res.measure(keys, run)
    server.drop_db(url)


# -- report ----------------------------------------------------------------------------------------


def fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(res: Results) -> str:
    lines = ["| scenario | system | unit | median | min–max | runs |", "|---|---|---|---|---|---|"]
    for fig in res.figures.values():
        if fig.ok:
            lo, hi = min(fig.values), max(fig.values)
            lines.append(
                f"| {fig.name} | {fig.system} | {fig.unit} | {fmt(fig.median)} | "
                f"{fmt(lo)}–{fmt(hi)} | {len(fig.values)} |"
            )
        else:
            why = fig.errors[0] if fig.errors else "not run"
            lines.append(f"| {fig.name} | {fig.system} | {fig.unit} | FAIL | {why} | {len(fig.values)} |")
    return "\n".join(lines)


@dataclass
class Target:
    what: str
    ours: str
    base: str
    goal: float
    higher_is_better: bool  # ratio must be >= goal, else <= goal


def targets(res: Results, sizes: Sizes) -> list[Target]:
    small, big = sizes.rss_marks[0] if sizes.rss_marks else 0, max(sizes.rss_marks) if sizes.rss_marks else 0
    return [
        Target(
            "drain 1x4 threads ÷ raw 4 procs x 100 jobs/txn", "ours.drain.t4", "raw.drain.p4b100", 0.25, True
        ),
        Target(
            "drain 4 procs x 1 thread ÷ raw 4 procs x 100 jobs/txn",
            "ours.drain.p4",
            "raw.drain.p4b100",
            0.25,
            True,
        ),
        Target("pickup latency p50 ÷ raw p50", "ours.lat.p50", "raw.lat.p50", 1.5, False),
        Target("enqueue 1 call/txn ÷ raw INSERT/txn", "ours.enq1", "raw.enq1", 0.8, True),
        Target("call_many ÷ raw multi-row INSERT", "ours.enqbulk", "raw.enqbulk", 0.5, True),
        Target("cursor chain p50 ÷ pickup latency p50", "ours.chain.p50", "ours.lat.p50", 2.0, False),
        Target(
            f"drain, {sizes.table_small:,} ÷ {sizes.table_big:,} finished rows (slowdown)",
            "ours.table.small.drain",
            "ours.table.big.drain",
            1.2,
            False,
        ),
        Target(
            f"pickup p50, {sizes.table_big:,} ÷ {sizes.table_small:,} finished rows",
            "ours.table.big.lat.p50",
            "ours.table.small.lat.p50",
            1.2,
            False,
        ),
        Target(
            f"worker RSS after {big:,} ÷ after {small:,} jobs",
            f"ours.rss.{big}",
            f"ours.rss.{small}",
            1.10,
            False,
        ),
    ]


def verdicts(res: Results, sizes: Sizes) -> tuple[str, list[dict[str, Any]]]:
    lines = ["| target | ratio (median) | ratio range | goal | verdict |", "|---|---|---|---|---|"]
    out = []
    for t in targets(res, sizes):
        a, b = res.get(t.ours), res.get(t.base)
        goal = f"{'≥' if t.higher_is_better else '≤'} {t.goal:g}×"
        if a is None or b is None:
            continue  # scenario not selected
        if not (a.ok and b.ok):
            lines.append(f"| {t.what} | FAIL | | {goal} | FAIL |")
            out.append({"target": t.what, "verdict": "FAIL"})
            continue
        if b.median == 0:
            lines.append(f"| {t.what} | n/a (baseline is 0) | | {goal} | FAIL |")
            out.append({"target": t.what, "verdict": "FAIL"})
            continue
        ratio = a.median / b.median
        # range: pairing each run of one side with each of the other (same process, same run)
        ratios = [x / y for x in a.values for y in b.values if y]
        met = ratio >= t.goal if t.higher_is_better else ratio <= t.goal
        verdict = "MET" if met else "NOT MET"
        lines.append(
            f"| {t.what} | {ratio:.2f}× | {min(ratios):.2f}–{max(ratios):.2f}× | {goal} | {verdict} |"
        )
        out.append({"target": t.what, "ratio": ratio, "goal": t.goal, "verdict": verdict})
    return "\n".join(lines), out


# -- main ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Sizes]:
    p = argparse.ArgumentParser(
        prog="python3 -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (~1-2 min)")
    p.add_argument(
        "--database-url",
        default=os.environ.get("MQ_DATABASE_URL"),
        help="PostgreSQL server to use (default: $MQ_DATABASE_URL, else an embedded pgserver); "
        "the benchmark creates and drops databases of its own there",
    )
    p.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated scenarios to run (default: all of {','.join(SCENARIOS)})",
    )
    p.add_argument("--repeats", type=int, help="repeats of each scenario except rss")
    p.add_argument("--enqueue-jobs", type=int)
    p.add_argument("--drain-jobs", type=int)
    p.add_argument("--latency-probes", type=int)
    p.add_argument("--chain-jobs", type=int)
    p.add_argument("--small-table", type=int, help="finished rows, small table (default 10,000)")
    p.add_argument("--big-table", type=int, help="finished rows, big table (default 1,000,000)")
    p.add_argument("--rss-jobs", type=str, help="comma-separated job counts at which the worker RSS is read")
    p.add_argument(
        "--with-workflows", action="store_true", help="also run bench/workflows_bench.py if it exists"
    )
    p.add_argument(
        "--workflows-args",
        default=None,
        help="arguments for workflows_bench.py (default: its smoke sizes with --quick, else its own)",
    )
    p.add_argument("--json", help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    sizes = Sizes(**asdict(QUICK if args.quick else FULL))
    for flag, attr in [
        ("repeats", "repeats"),
        ("enqueue_jobs", "enqueue"),
        ("drain_jobs", "drain"),
        ("latency_probes", "latency"),
        ("chain_jobs", "chain"),
        ("small_table", "table_small"),
        ("big_table", "table_big"),
    ]:
        if getattr(args, flag) is not None:
            setattr(sizes, attr, getattr(args, flag))
    for attr in ("repeats", "enqueue", "drain", "latency", "chain", "table_small", "table_big"):
        if getattr(sizes, attr) < 1:
            p.error(f"{attr} must be at least 1")
    if args.rss_jobs:
        sizes.rss_marks = sorted(int(x) for x in args.rss_jobs.split(","))
    unknown = set(args.only.split(",")) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios: {sorted(unknown)}")
    return args, sizes


def main(argv: list[str] | None = None) -> int:
    args, sizes = parse_args(argv)
    only = args.only.split(",")
    started = time.monotonic()
    commit_before = git_state(REPO)
    load_before = f"{os.getloadavg()[0]:.2f}"
    server = Server(args.database_url)
    res = Results()
    plans: dict[str, str] = {}
    workflows_rc = 0
    try:
        settings = server.settings()
        log(f"PostgreSQL {'embedded (pgserver)' if server.embedded else 'at --database-url'}: {settings}")
        for r in range(1, sizes.repeats + 1):
            log(f"== repeat {r}/{sizes.repeats}")
            if "enqueue" in only:
                run_enqueue(server, res, sizes)
            if "drain" in only:
                run_drain(server, res, sizes)
            if "latency" in only:
                run_latency(server, res, sizes)
            if "chain" in only:
                run_chain(server, res, sizes)
            # the big-table setup is the slow part: one repeat in quick runs, two at most
            if "table" in only and r <= min(2, sizes.repeats):
                run_table(server, res, sizes, plans)
        if "rss" in only and sizes.rss_marks:
            run_rss(server, res, sizes)  # once: it is the longest scenario
        if args.with_workflows:
            extra = args.workflows_args
            if extra is None and args.quick:
                extra = "--chain 50 --fan 200 --scale 200 2000 --repeats 1"  # its documented smoke run
            workflows_rc = run_workflows(server, (extra or "").split())
    finally:
        server.close()
    commit_after = git_state(REPO)

    target_table, target_rows = verdicts(res, sizes)
    print()
    print(f"machine: {machine()}")
    print(
        f"python: {sys.version.split()[0]}; PostgreSQL: {settings.get('server_version')} "
        f"({'embedded pgserver' if server.embedded else 'external'}); fsync={settings.get('fsync')}, "
        f"synchronous_commit={settings.get('synchronous_commit')}, shared_buffers={settings.get('shared_buffers')}"
    )
    import psycopg2_mq

    print(
        f"library: {os.path.dirname(psycopg2_mq.__file__)} at {commit_before}"
        + ("" if commit_after == commit_before else f" -> at the end: {commit_after}")
    )
    print(
        f"sizes: {asdict(sizes)}; {time.monotonic() - started:.0f}s; "
        f"load average at start {load_before}, at end {os.getloadavg()[0]:.2f} (other work on the box skews figures)"
    )
    print()
    print(table(res))
    print()
    print(target_table)
    if plans.get("big"):
        print()
        print(f"claim statement at {sizes.table_big:,} finished rows (EXPLAIN ANALYZE):")
        print(plans["big"])
    failed = [f for f in res.figures.values() if not f.ok]
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {
                    "commit": commit_before,
                    "commit_after": commit_after,
                    "settings": settings,
                    "sizes": asdict(sizes),
                    "figures": {k: asdict(f) for k, f in res.figures.items()},
                    "targets": target_rows,
                    "plans": plans,
                },
                out,
                indent=1,
            )
    if failed or workflows_rc:
        print(
            f"\nFAIL: {len(failed)} figure(s) failed their checks"
            + (f"; workflows benchmark exited {workflows_rc}" if workflows_rc else "")
        )
        return 1
    return 0


def run_workflows(server: Server, extra: list[str]) -> int:
    """Run the workflow benchmark (owned by another module) against the same server, if present."""
    script = Path(__file__).with_name("workflows_bench.py")
    if not script.exists():
        log("no bench/workflows_bench.py: skipped")
        return 0
    log("bench/workflows_bench.py")
    env = dict(
        os.environ,
        MQ_DATABASE_URL=server.url.set(drivername="postgresql").render_as_string(hide_password=False),
    )
    return subprocess.run(
        [sys.executable, "-m", "bench.workflows_bench", *extra], cwd=REPO, env=env
    ).returncode


if __name__ == "__main__":
    sys.exit(main())
