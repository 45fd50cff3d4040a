"""What a step's job knows about its workflow: ``workflows.context(job)``.

The coordinator puts the context in the step job's ``trace`` (under
``"workflow"``), so the step's own ``args`` stay exactly as declared and a job
needs no database session to read its inputs::

    class Etl:
        def execute_job(self, job):
            ctx = workflows.context(job)
            rows = ctx.result("fetch")            # what the "fetch" step returned
            return transform(rows, **job.args)

The context is fixed when the job is called, so a retried job sees the same
inputs. Results are JSON, and meant to be small (ids, paths, counts): large
data belongs in your own tables, referenced from a result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._advance import TRACE_KEY
from .rules import StepStates


@dataclass(frozen=True)
class UpstreamResult:
    """The final state and result of one upstream step."""

    state: str
    #: the job's result; its error result if it failed; for a mapped step the
    #: list of its items' results; ``None`` if it was skipped or canceled
    result: Any

    @property
    def succeeded(self) -> bool:
        return self.state == StepStates.COMPLETED


@dataclass(frozen=True)
class StepContext:
    """A step job's view of its run."""

    run_id: int
    workflow: str
    #: the step's name (a map item's is its mapped step's name)
    step: str
    #: the ``args`` the run was started with
    run_args: dict[str, Any]
    #: every upstream step, by name, whatever its state (fan-in sees failures too)
    upstream: dict[str, UpstreamResult]
    #: for the items of a mapped step: the item's position and value
    index: int | None = None
    item: Any = None

    def result(self, step: str) -> Any:
        """The result of upstream step ``step`` (``KeyError`` if it is not one)."""
        return self.upstream[step].result

    @property
    def results(self) -> dict[str, Any]:
        """The results of the upstream steps that completed."""
        return {name: up.result for name, up in self.upstream.items() if up.succeeded}

    @property
    def failed(self) -> list[str]:
        """The upstream steps that failed or were canceled."""
        return [
            name for name, up in self.upstream.items() if up.state in (StepStates.FAILED, StepStates.CANCELED)
        ]


def context(job: Any) -> StepContext:
    """The workflow context of a step job (``psycopg2_mq.Job`` or a ``model.Job`` row).

    Raises ``ValueError`` for a job that is not a workflow step.
    """
    trace = getattr(job, "trace", None)
    ctx = trace.get(TRACE_KEY) if isinstance(trace, dict) else None
    if not isinstance(ctx, dict) or "run_id" not in ctx:
        raise ValueError(
            f"job {getattr(job, 'id', '?')} is not a workflow step (no workflow context in its trace)"
        )
    return StepContext(
        run_id=ctx["run_id"],
        workflow=ctx["workflow"],
        step=ctx["step"],
        run_args=ctx.get("run_args") or {},
        upstream={
            name: UpstreamResult(up["state"], up.get("result"))
            for name, up in ctx.get("upstream", {}).items()
        },
        index=ctx.get("index"),
        item=ctx.get("item"),
    )
