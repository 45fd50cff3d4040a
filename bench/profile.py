"""Where a draining worker spends its time: ``python3 -m bench.profile``.

Queues ``--jobs`` no-op jobs, starts one ``MQWorker(threads=--threads)`` process
and samples it with py-spy (``pip install py-spy``) until the queue is drained.
Prints:

* the CPU split: worker process vs PostgreSQL backends (from /proc), per job;
* transactions per job (``pg_stat_database.xact_commit``: every statement the
  worker sends in autocommit mode is one), i.e. round trips per job;
* py-spy's samples aggregated by function: inclusive ("in this call or below")
  and self, for the active samples (and, with ``--idle``, those waiting in I/O).

It is a diagnostic for docs/performance.md, not part of the table.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from . import scenarios
from .harness import Server, sql, tracked, vacuum_analyze


def _ticks(pids: list[int]) -> float:
    """User+system CPU seconds of these processes (and their threads)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def _busy() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _xacts(url: sa.URL) -> int:
    return int(
        sql(
            url, "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
        )[0][0]
    )


def summarize(raw_file: str, top: int) -> str:
    """Aggregate py-spy's raw (collapsed) stacks into inclusive and self tables."""
    inclusive: collections.Counter[str] = collections.Counter()
    selfs: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in Path(raw_file).read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        if frames[0].startswith("thread ") or frames[0].startswith("process "):
            threads[frames[0]] += count
        names = [
            f.split(" (")[0]
            + (" (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")" if " (" in f else "")
            for f in frames
        ]
        for name in set(names):
            inclusive[name] += count
        selfs[names[-1]] += count
    out = [f"{total} samples"]
    if threads:
        out.append(
            "by thread: " + ", ".join(f"{t}: {100 * c / total:.0f}%" for t, c in threads.most_common())
        )
    out.append("\ninclusive (share of samples in this function or below):")
    out += [f"  {100 * c / total:5.1f}%  {name}" for name, c in inclusive.most_common(top)]
    out.append("\nself (share of samples with this function on top):")
    out += [f"  {100 * c / total:5.1f}%  {name}" for name, c in selfs.most_common(top)]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(
        prog="python3 -m bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--database-url", default=os.environ.get("MQ_DATABASE_URL"))
    p.add_argument("--jobs", type=int, default=20_000)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--idle", action="store_true", help="also sample threads waiting in I/O (py-spy --idle)")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=30)
    p.add_argument(
        "--out", default="/tmp/mq-bench-profile", help="folder for py-spy's raw output and flame graph"
    )
    args = p.parse_args()
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    server = Server(args.database_url)
    try:
        url = server.fresh_db("profile")
        scenarios.setup(url)
        scenarios.call_many(url, 0, args.jobs)
        vacuum_analyze(url)
        with tracked(args.jobs) as tracker:
            workers = scenarios._start(url, tracker, args.threads)
            pid = workers.pids[0]
            raw_file = os.path.join(args.out, "worker.txt")
            flame = os.path.join(args.out, "worker.svg")
            cmd = [
                pyspy,
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(args.rate),
                "--threads",
                "--format",
                "raw",
                "--output",
                raw_file,
                "--nonblocking",
            ]
            if args.idle:
                cmd.append("--idle")
            spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)  # py-spy attaches
            # PostgreSQL backends come and go: count the machine's busy time instead
            # (run it on an otherwise quiet machine; py-spy's own share is included)
            cpu_w0, busy0, x0 = _ticks([pid]), _busy(), _xacts(url)
            t0 = workers.go()
            try:
                tracker.wait_done(args.jobs, timeout=900, alive=workers.alive)
                t_end = tracker.last_end()
                time.sleep(0.2)  # the last completions
                cpu_w1, busy1, x1 = _ticks([pid]), _busy(), _xacts(url)
            finally:
                workers.stop()
                spy.wait(timeout=60)
            tracker.check_exactly_once()
        scenarios.check_completed(url, args.jobs)
        n, wall = args.jobs, t_end - t0
        print(
            f"drained {n} jobs with 1 process x {args.threads} threads in {wall:.2f}s: {n / wall:.0f} jobs/s"
        )
        worker_cpu = cpu_w1 - cpu_w0
        other = (busy1 - busy0) - worker_cpu
        print(
            f"CPU: worker process {worker_cpu:.2f}s ({1e6 * worker_cpu / n:.0f} µs/job, "
            f"{100 * worker_cpu / wall:.0f}% of one core); everything else (PostgreSQL, py-spy, this process) "
            f"{other:.2f}s ({1e6 * other / n:.0f} µs/job, {100 * other / wall:.0f}% of one core); "
            f"{os.cpu_count()} cores"
        )
        print(f"transactions (autocommit statements) per job: {(x1 - x0) / n:.2f}")
        print()
        print(summarize(raw_file, args.top))
        subprocess.run([pyspy, "--version"], check=False, stdout=subprocess.DEVNULL)
        print(f"\nraw stacks: {raw_file} (flame graph: py-spy record --format flamegraph -o {flame} ...)")
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
