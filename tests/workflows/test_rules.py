"""Trigger rules as pure functions."""

from __future__ import annotations

import pytest

from workflows.rules import TRIGGER_RULES, should_run

C, F, S, X = "completed", "failed", "skipped", "canceled"

CASES = {
    # upstream states: expected decision per rule
    (C, C): {
        "all_success": True,
        "all_done": True,
        "one_success": True,
        "one_failed": False,
        "none_failed": True,
        "always": True,
    },
    (C, F): {
        "all_success": False,
        "all_done": True,
        "one_success": True,
        "one_failed": True,
        "none_failed": False,
        "always": True,
    },
    (F, F): {
        "all_success": False,
        "all_done": True,
        "one_success": False,
        "one_failed": True,
        "none_failed": False,
        "always": True,
    },
    (C, S): {
        "all_success": False,
        "all_done": True,
        "one_success": True,
        "one_failed": False,
        "none_failed": True,
        "always": True,
    },
    (S, S): {
        "all_success": False,
        "all_done": True,
        "one_success": False,
        "one_failed": False,
        "none_failed": True,
        "always": True,
    },
    (F, S): {
        "all_success": False,
        "all_done": True,
        "one_success": False,
        "one_failed": True,
        "none_failed": False,
        "always": True,
    },
    (C, X): {
        "all_success": False,
        "all_done": True,
        "one_success": True,
        "one_failed": True,
        "none_failed": False,
        "always": True,
    },
}


@pytest.mark.parametrize("states", list(CASES))
@pytest.mark.parametrize("rule", TRIGGER_RULES)
def test_rule_table(rule, states):
    assert should_run(rule, states) is CASES[states][rule]


@pytest.mark.parametrize("rule", TRIGGER_RULES)
def test_roots_always_run(rule):
    assert should_run(rule, []) is True


def test_undecided_upstream_and_unknown_rule_raise():
    with pytest.raises(ValueError, match="every upstream step is terminal"):
        should_run("all_success", ["completed", "queued"])
    with pytest.raises(ValueError, match="unknown trigger rule"):
        should_run("most_success", ["completed"])
