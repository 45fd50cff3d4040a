"""Rendering a run as DOT, Mermaid and a text table."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from workflows import RunStatus, StepStatus, to_dot, to_mermaid, to_text

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def sample() -> RunStatus:
    def step(name, state, after=(), **kw):
        base = {
            "attempts": 1,
            "job_id": None,
            "queued_time": T0,
            "start_time": None,
            "end_time": None,
            "result": None,
            "error": None,
        }
        base.update(kw)
        return StepStatus(name=name, state=state, after=list(after), trigger_rule="all_success", **base)

    return RunStatus(
        id=7,
        workflow="etl",
        key=None,
        state="failed",
        created_time=T0,
        finished_time=T0,
        steps=[
            step("fetch", "completed", start_time=T0, end_time=T0 + timedelta(seconds=1.5), result=[1, 2]),
            step("each", "failed", ["fetch"], error={"type": "ValueError", "message": "bad row"}),
            StepStatus("each[0]", "completed", 1, 3, T0, T0, T0, {"ok": True}, None, parent="each", index=0),
            step('say "hi"', "skipped", ["each"], attempts=0),
        ],
    )


def test_dot():
    dot = to_dot(sample())
    assert dot.startswith('digraph "etl #7" {')
    assert '"fetch" [label="fetch: completed", fillcolor="#a3e4a3"];' in dot
    assert '"each" [label="each ×1: failed"' in dot
    assert '"say \\"hi\\"" [label="say \\"hi\\": skipped"' in dot
    assert '"fetch" -> "each";' in dot and '"each" -> "say \\"hi\\"";' in dot
    assert "each[0]" not in dot


def test_mermaid():
    text = to_mermaid(sample())
    assert text.splitlines()[0] == "flowchart LR"
    assert '  s0["fetch: completed"]:::completed' in text
    assert '  s2["say #quot;hi#quot;: skipped"]:::skipped' in text
    assert "  s0 --> s1" in text and "  s1 --> s2" in text
    assert "  classDef failed fill:#f4a6a6" in text


def test_text_table():
    lines = to_text(sample()).splitlines()
    assert lines[0] == "etl run 7: failed"
    assert lines[1].split() == ["STEP", "STATE", "ATTEMPTS", "DURATION", "RESULT", "/", "ERROR"]
    assert lines[3].split() == ["fetch", "completed", "1", "1.500s", "[1,2]"]
    assert lines[4].split()[:3] == ["each", "failed", "1"] and lines[4].endswith("ValueError: bad row")
    assert lines[5].startswith("  each[0]")
    assert lines[6].split()[-2:] == ["skipped", "0"]
