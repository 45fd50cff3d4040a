"""Render a run: Graphviz DOT, Mermaid flowchart text, or a plain text table.

The graphs show the declared steps (a mapped step is one node, labelled with
its items' count), coloured by state; the table lists every step and item.
"""

from __future__ import annotations

import json
from typing import Any

from .rules import StepStates
from .status import RunStatus, StepStatus

#: fill colours by state, shared by DOT and Mermaid
STATE_COLORS = {
    StepStates.WAITING: "#eeeeee",
    StepStates.QUEUED: "#cfe2ff",
    StepStates.RUNNING: "#9ec5fe",
    StepStates.COMPLETED: "#a3e4a3",
    StepStates.FAILED: "#f4a6a6",
    StepStates.SKIPPED: "#fff3b0",
    StepStates.CANCELED: "#cccccc",
}


def _declared(status: RunStatus) -> list[StepStatus]:
    return [s for s in status.steps if s.parent is None]


def _items(status: RunStatus) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in status.steps:
        if s.parent is not None:
            counts[s.parent] = counts.get(s.parent, 0) + 1
    return counts


def _label(step: StepStatus, items: dict[str, int]) -> str:
    extra = f" ×{items[step.name]}" if step.name in items else ""
    return f"{step.name}{extra}: {step.state}"


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(status: RunStatus) -> str:
    """The run as a Graphviz ``digraph`` (``dot -Tsvg``), nodes filled by state."""
    items = _items(status)
    lines = [
        f"digraph {_dot_quote(f'{status.workflow} #{status.id}')} {{",
        "  rankdir=LR;",
        f"  label={_dot_quote(f'{status.workflow} run {status.id}: {status.state}')};",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica"];',
    ]
    steps = _declared(status)
    for s in steps:
        color = STATE_COLORS.get(s.state, "#ffffff")
        lines.append(
            f"  {_dot_quote(s.name)} [label={_dot_quote(_label(s, items))}, fillcolor={_dot_quote(color)}];"
        )
    for s in steps:
        for dep in s.after:
            lines.append(f"  {_dot_quote(dep)} -> {_dot_quote(s.name)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_mermaid(status: RunStatus) -> str:
    """The run as a Mermaid ``flowchart``; node ids are ``s0``, ``s1``… (names may be anything)."""
    items = _items(status)
    steps = _declared(status)
    ids = {s.name: f"s{i}" for i, s in enumerate(steps)}
    lines = ["flowchart LR"]
    for s in steps:
        label = _label(s, items).replace('"', "#quot;")
        lines.append(f'  {ids[s.name]}["{label}"]:::{s.state}')
    for s in steps:
        for dep in s.after:
            lines.append(f"  {ids[dep]} --> {ids[s.name]}")
    for state in StepStates.ALL:
        lines.append(f"  classDef {state} fill:{STATE_COLORS[state]}")
    return "\n".join(lines) + "\n"


def _short(value: Any, width: int = 40) -> str:
    if value is None:
        return ""
    if isinstance(value, dict) and "message" in value and "type" in value:
        text = f"{value['type']}: {value['message']}"
    else:
        text = json.dumps(value, separators=(",", ":"), default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def to_text(status: RunStatus) -> str:
    """A fixed-width table: one line per step (items indented under their step)."""
    header = ("STEP", "STATE", "ATTEMPTS", "DURATION", "RESULT / ERROR")
    rows = []
    for s in status.steps:
        name = f"  {s.name}" if s.parent else s.name
        duration = "" if s.duration is None else f"{s.duration:.3f}s"
        detail = _short(s.error) if s.state == StepStates.FAILED else _short(s.result)
        rows.append((name, s.state, str(s.attempts), duration, detail))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    title = f"{status.workflow} run {status.id}: {status.state}"
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
    return "\n".join(lines) + "\n"
