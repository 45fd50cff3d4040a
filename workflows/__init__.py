"""workflows: DAGs of queue calls, advanced by cursor-serialized coordinator jobs.

* ``Workflow`` / ``Step`` declare a DAG, validated with networkx (``definition.py``).
* ``make_workflow_model(metadata)`` declares the ``wf_run`` and ``wf_step`` tables (``model.py``).
* ``WorkflowSource`` starts, inspects, waits for, cancels and retries runs (``source.py``).
* ``WorkflowCoordinator`` is the queue object whose jobs advance runs (``coordinator.py``).
* ``context(job)`` is what a step's job knows about its run (``context.py``).
* ``to_dot`` / ``to_mermaid`` / ``to_text`` render a run (``render.py``).

It uses only the public API of ``psycopg2_mq``; see ``docs/workflows.md``.
"""

from .context import StepContext, UpstreamResult, context
from .coordinator import WorkflowCoordinator
from .definition import Step, Workflow, WorkflowDefinitionError
from .model import WorkflowModel, make_workflow_model
from .render import to_dot, to_mermaid, to_text
from .rules import TRIGGER_RULES, RunStates, StepStates
from .source import DEFAULT_COORDINATOR_QUEUE, InvalidStepStateError, RunNotFoundError, WorkflowSource
from .status import RunStatus, RunSummary, StepStatus

__all__ = [
    "DEFAULT_COORDINATOR_QUEUE",
    "TRIGGER_RULES",
    "InvalidStepStateError",
    "RunNotFoundError",
    "RunStates",
    "RunStatus",
    "RunSummary",
    "Step",
    "StepContext",
    "StepStates",
    "StepStatus",
    "UpstreamResult",
    "Workflow",
    "WorkflowCoordinator",
    "WorkflowDefinitionError",
    "WorkflowModel",
    "WorkflowSource",
    "context",
    "make_workflow_model",
    "to_dot",
    "to_mermaid",
    "to_text",
]
