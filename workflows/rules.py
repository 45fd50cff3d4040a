"""Trigger rules: when a step whose upstream steps are all terminal runs.

Pure functions over the upstream steps' final states, so the coordinator and
the documentation (``docs/workflows.md``) agree on one table. A step is only
decided once *every* upstream step is terminal; a rule that is not met then
makes the step ``skipped``, which its own dependents see like any other state.

A step without upstream steps (a root) always runs, whatever its rule.
"""

from __future__ import annotations

from collections.abc import Iterable


class StepStates:
    """The states of a workflow step; see ``docs/workflows.md``.

    ``running`` is not stored: a ``queued`` step is reported as running while
    its job runs (the queue, not the workflow layer, knows when a job starts).
    """

    WAITING = "waiting"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELED = "canceled"

    #: the states stored in ``wf_step.state``
    STORED = (WAITING, QUEUED, COMPLETED, FAILED, SKIPPED, CANCELED)
    ALL = (WAITING, QUEUED, RUNNING, COMPLETED, FAILED, SKIPPED, CANCELED)
    #: states a step never leaves (unless ``retry_step`` re-opens a failed one)
    TERMINAL = (COMPLETED, FAILED, SKIPPED, CANCELED)


class RunStates:
    """The states of a workflow run."""

    RUNNING = "running"
    #: ``cancel_run`` was called; jobs already running finish, nothing new starts
    CANCELING = "canceling"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"

    ALL = (RUNNING, CANCELING, COMPLETED, FAILED, CANCELED)
    ACTIVE = (RUNNING, CANCELING)
    TERMINAL = (COMPLETED, FAILED, CANCELED)


ALL_SUCCESS = "all_success"
ALL_DONE = "all_done"
ONE_SUCCESS = "one_success"
ONE_FAILED = "one_failed"
NONE_FAILED = "none_failed"
ALWAYS = "always"

TRIGGER_RULES = (ALL_SUCCESS, ALL_DONE, ONE_SUCCESS, ONE_FAILED, NONE_FAILED, ALWAYS)

#: upstream states that count as a failure: a canceled step did not succeed
#: and was not skipped by a rule either
_FAILED_LIKE = (StepStates.FAILED, StepStates.CANCELED)


def check_rule(rule: str) -> str:
    """Return ``rule`` if it is a known trigger rule, else raise ``ValueError``."""
    if rule not in TRIGGER_RULES:
        raise ValueError(f"unknown trigger rule {rule!r}; expected one of {', '.join(TRIGGER_RULES)}")
    return rule


def should_run(rule: str, upstream_states: Iterable[str]) -> bool:
    """Whether a step with ``rule`` runs, given its upstream steps' terminal states.

    ``True``: enqueue it. ``False``: it is skipped.
    """
    states = list(upstream_states)
    check_rule(rule)
    not_terminal = [s for s in states if s not in StepStates.TERMINAL]
    if not_terminal:
        raise ValueError(f"a rule is decided once every upstream step is terminal, not {not_terminal}")
    if not states:
        return True
    succeeded = sum(s == StepStates.COMPLETED for s in states)
    failed = sum(s in _FAILED_LIKE for s in states)
    if rule == ALL_SUCCESS:
        return succeeded == len(states)
    if rule == ONE_SUCCESS:
        return succeeded > 0
    if rule == ONE_FAILED:
        return failed > 0
    if rule == NONE_FAILED:
        return failed == 0
    # ALL_DONE and ALWAYS: every upstream step is terminal, which is all they ask
    return True
