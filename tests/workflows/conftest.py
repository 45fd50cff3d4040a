"""Fixtures of the workflow tests: a coordinator, sources and workers.

The workflow tables (fixture ``workflow_model``) are declared by the shared
conftest next to the queue's, and emptied before each test like them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from psycopg2_mq import Model
from workflows import WorkflowCoordinator, WorkflowModel, WorkflowSource

from ..support import running_worker


@pytest.fixture
def coordinator(engine: sa.Engine, model: Model, workflow_model: WorkflowModel) -> WorkflowCoordinator:
    return WorkflowCoordinator(engine=engine, model=model, workflow_model=workflow_model)


@pytest.fixture
def wf_session(engine: sa.Engine, model: Model, workflow_model: WorkflowModel) -> Callable[[], Any]:
    """``with wf_session() as wf:`` a ``WorkflowSource`` in a transaction committed at the end."""
    from contextlib import contextmanager

    @contextmanager
    def open_source() -> Iterator[WorkflowSource]:
        with Session(engine) as session, session.begin():
            yield WorkflowSource(dbsession=session, model=model, workflow_model=workflow_model)

    return open_source


@pytest.fixture
def workers(
    engine: sa.Engine, model: Model, coordinator: WorkflowCoordinator
) -> Callable[..., AbstractContextManager[Any]]:
    """``with workers({"steps": queue}, threads=2):`` one worker serving those queues and the coordinator."""

    def start(queues: dict[str, Any], threads: int = 2, **kwargs: Any) -> AbstractContextManager[Any]:
        return running_worker(
            engine,
            model,
            {"workflows": coordinator, **queues},
            threads=threads,
            maintenance_interval=0.5,
            **kwargs,
        )

    return start
