"""Declaring workflows: validation errors name the offending steps; composition."""

from __future__ import annotations

import pytest

from workflows import Step, Workflow, WorkflowDefinitionError


def test_builder_orders_steps_and_snapshots_them():
    wf = Workflow("etl")
    fetch = wf.step("fetch", queue="etl", method="fetch", args={"source": "s3"})
    wf.step("load", queue="etl", method="load", after=fetch, trigger_rule="all_done", retries=2)
    assert [s.name for s in wf.steps] == ["fetch", "load"]
    snap = wf.to_snapshot()
    assert snap["name"] == "etl"
    assert snap["steps"][1] == {
        "name": "load",
        "queue": "etl",
        "method": "load",
        "args": {},
        "after": ["fetch"],
        "trigger_rule": "all_done",
        "cursor_key": None,
        "retries": 2,
        "retry_delay": 0.0,
        "map_over": None,
        "max_items": None,
    }


def test_cycle_names_its_steps():
    with pytest.raises(WorkflowDefinitionError, match=r"cycle: .*a -> b -> c -> a|cycle") as err:
        Workflow(
            "loop",
            [
                Step("a", "q", "m", after=("c",)),
                Step("b", "q", "m", after=("a",)),
                Step("c", "q", "m", after=("b",)),
                Step("ok", "q", "m"),
            ],
        )
    assert sorted(err.value.steps) == ["a", "b", "c"]
    assert "'loop' has a cycle" in str(err.value)


def test_unknown_dependency_is_named():
    with pytest.raises(WorkflowDefinitionError, match="'b' depends on 'nope'") as err:
        Workflow("w", [Step("a", "q", "m"), Step("b", "q", "m", after=("a", "nope"))])
    assert err.value.steps == ["b", "nope"]
    wf = Workflow("w")
    with pytest.raises(WorkflowDefinitionError, match="'b' depends on unknown step"):
        wf.step("b", queue="q", method="m", after=["later"])


def test_duplicate_names_are_named():
    with pytest.raises(WorkflowDefinitionError, match="duplicate step name 'a'") as err:
        Workflow("w", [Step("a", "q", "m"), Step("a", "q", "n")])
    assert err.value.steps == ["a"]
    wf = Workflow("w")
    wf.step("a", queue="q", method="m")
    with pytest.raises(WorkflowDefinitionError, match="duplicate step name 'a'"):
        wf.step("a", queue="q", method="m")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"trigger_rule": "sometimes"}, "unknown trigger rule"),
        ({"args": {"x": object()}}, "args must be JSON"),
        ({"map_over": "a"}, "map_over needs max_items"),
        ({"max_items": 3}, "max_items only applies with map_over"),
        ({"retries": -1}, "retries must be"),
        ({"after": ("s",)}, "depends on itself"),
    ],
)
def test_step_errors(kwargs, message):
    with pytest.raises(WorkflowDefinitionError, match=message):
        Step("s", "q", "m", **kwargs)


def test_item_names_are_reserved():
    with pytest.raises(WorkflowDefinitionError, match="may not contain"):
        Step("s[1]", "q", "m")


def test_map_over_is_a_dependency():
    step = Step("each", "q", "m", map_over="list", max_items=10)
    assert step.after == ("list",)


def report_fragment(source: str) -> list[Step]:
    """A reusable fragment: summarize, then publish."""
    return [
        Step("summarize", "reports", "summarize", args={"source": source}),
        Step("publish", "reports", "publish", after=("summarize",)),
    ]


def test_composition_prefixes_and_links_fragments():
    wf = Workflow("daily")
    wf.step("ingest", queue="etl", method="ingest")
    wf.include(report_fragment("sales"), prefix="sales.", after=["ingest"])
    wf.include(report_fragment("stock"), prefix="stock.", after=["ingest"])
    wf.step("notify", queue="mail", method="send", after=["sales.publish", "stock.publish"])
    assert wf["sales.summarize"].after == ("ingest",)
    assert wf["stock.publish"].after == ("stock.summarize",)
    assert wf["stock.summarize"].args == {"source": "stock"}
    assert len(wf) == 6
    other = Workflow("weekly", report_fragment("all"))
    with pytest.raises(WorkflowDefinitionError, match="duplicate step name 'summarize'"):
        other.include(report_fragment("again"))
    copy = Workflow("copy")
    copy.include(wf, prefix="x.")
    assert copy["x.notify"].after == ("x.sales.publish", "x.stock.publish")
