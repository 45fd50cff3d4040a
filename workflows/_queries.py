"""The SQL of the workflow layer, in one place.

``{run}``, ``{step}`` and ``{job}`` are the (quoted, schema-qualified) table
names and ``{trace_key}`` the key of a step job's workflow context in its
trace; parameters use SQLAlchemy's ``:name`` style. Every statement finds its
rows by ``wf_run.id``, by ``wf_step``'s primary key ``(run_id, name)`` (or
``ix_wf_step_parent``) or by ``mq_job``'s primary key, never by scanning a run,
except ``LOAD_OPEN_STEPS`` (cancel and the recovery path) and ``FINISH_RUN``
(once, when a run ends).

An advance is a handful of round trips, so the writes of an advance are
combined: the steps' changes are written once, at the end, in the statement
that also updates the run (see ``combine``).
"""

from __future__ import annotations

LOCK_RUN = """
SELECT id, workflow, state, args, coordinator_queue, unfinished FROM {run} WHERE id = :run_id FOR UPDATE
"""

_STEP_COLUMNS = "name, parent, item_index, spec, state, waiting_on, items_left, attempts, job_id"

LOAD_STEPS = f"SELECT {_STEP_COLUMNS} FROM {{step}} WHERE run_id = :run_id AND name = ANY(:names)"

# Finished jobs and, in the same round trip, the steps their traces name (by
# primary key). A job of another run (or no step) comes back with NULL step columns.
LOAD_FINISHED_JOBS = f"""
SELECT j.id AS job_key, j.state AS job_state, j.result AS job_result, j.trace AS job_trace,
       j.on_finish IS NOT NULL AS has_on_finish,
       {", ".join(f"s.{c.strip()}" for c in _STEP_COLUMNS.split(","))}
FROM {{job}} AS j
LEFT JOIN {{step}} AS s ON s.run_id = :run_id
    AND j.trace -> '{{trace_key}}' -> 'run_id' = to_jsonb(CAST(:run_id AS bigint))
    AND s.name = coalesce(j.trace -> '{{trace_key}}' ->> 'item_step', j.trace -> '{{trace_key}}' ->> 'step')
WHERE j.id = ANY(:job_ids)
ORDER BY j.id
"""

LOAD_OPEN_STEPS = f"""
SELECT {_STEP_COLUMNS} FROM {{step}} WHERE run_id = :run_id AND state IN ('waiting', 'queued')
"""

LOAD_ITEM_ROWS = f"""
SELECT {_STEP_COLUMNS} FROM {{step}} WHERE run_id = :run_id AND parent = :parent ORDER BY item_index
"""

DELETE_STEP = "DELETE FROM {step} WHERE run_id = :run_id AND name = :name"

LOAD_RESULTS = "SELECT name, state, result FROM {step} WHERE run_id = :run_id AND name = ANY(:names)"

LOAD_ITEMS = """
SELECT name, item_index, state, result FROM {step}
WHERE run_id = :run_id AND parent = :parent ORDER BY item_index
"""

# Batched writes take the rows as one JSON object keyed by step name, and find
# the steps with ``name = ANY(:names)`` on the primary key. (A join with
# jsonb_to_recordset looks equivalent, but the planner cannot estimate the
# function's rows and may pick a nested loop over the run's steps: quadratic.)

# Writes the in-memory changes of many steps in one statement. A row without a
# "result" key keeps its stored result (the advance never read it).
SAVE_STEPS = """
UPDATE {step} AS s
SET state = r.state,
    result = CASE WHEN e.value ? 'result' THEN nullif(r.result, 'null'::jsonb) ELSE s.result END,
    job_id = r.job_id, attempts = r.attempts, waiting_on = r.waiting_on, items_left = r.items_left,
    queued_time = CASE WHEN r.queued THEN now() ELSE s.queued_time END,
    finished_time = CASE WHEN r.finished THEN now() WHEN r.state IN ('waiting', 'queued') THEN NULL
                         ELSE s.finished_time END
FROM jsonb_each(CAST(:rows AS jsonb)) AS e(name, value),
    LATERAL jsonb_to_record(e.value) AS r(
        state text, result jsonb, job_id bigint, attempts int, waiting_on int, items_left int,
        queued boolean, finished boolean)
WHERE s.run_id = :run_id AND s.name = ANY(:names) AND s.name = e.name
"""

INSERT_STEPS = """
INSERT INTO {step} (run_id, name, parent, item_index, spec, state, waiting_on, items_left, attempts, job_id,
                    queued_time)
SELECT :run_id, v.name, v.parent, v.item_index, v.spec, v.state, v.waiting_on, v.items_left, v.attempts,
       v.job_id, CASE WHEN v.state = 'queued' THEN now() END
FROM jsonb_to_recordset(CAST(:new_rows AS jsonb)) AS v(
    name text, parent text, item_index int, spec jsonb, state text, waiting_on int, items_left int,
    attempts int, job_id bigint)
"""

# Count down by :counts[name] (a JSON object); only steps still waiting count
# down, so a replayed advance, or a step canceled meanwhile, is left alone.
# Rows that reach zero come back whole (their spec only then: a wide fan-in's
# spec is large, and it is counted down once per upstream step).
_COUNTED_COLUMNS = """
s.name, s.parent, s.item_index, CASE WHEN {left} <= 0 THEN s.spec END, s.state, s.waiting_on, s.items_left,
s.attempts, s.job_id
"""

COUNT_DOWN_WAITING = f"""
UPDATE {{step}} AS s SET waiting_on = s.waiting_on - (CAST(:counts AS jsonb) ->> s.name)::int
WHERE s.run_id = :run_id AND s.name = ANY(:names) AND s.state = 'waiting'
RETURNING {_COUNTED_COLUMNS.format(left="s.waiting_on")}
"""

COUNT_DOWN_ITEMS = f"""
UPDATE {{step}} AS s SET items_left = s.items_left - (CAST(:counts AS jsonb) ->> s.name)::int
WHERE s.run_id = :run_id AND s.name = ANY(:names) AND s.state = 'queued'
RETURNING {_COUNTED_COLUMNS.format(left="s.items_left")}
"""

# Only for a run that is (again) active: retry_step re-opens a finished run.
SAVE_RUN = """
UPDATE {run} SET state = :state, unfinished = :unfinished, result = NULL, finished_time = NULL WHERE id = :run_id
"""

# Once per run, when its last step is terminal (and saved): the outcome, the
# sinks' results, and the NOTIFY that wait_for_run listens for (delivered at
# commit). :canceling is the run's state in memory (cancel_run may not have
# written it yet).
FINISH_RUN = """
UPDATE {run} AS r
SET state = CASE WHEN :canceling THEN 'canceled'
                 WHEN EXISTS (SELECT FROM {step} AS s WHERE s.run_id = r.id AND s.parent IS NULL
                              AND s.state IN ('failed', 'canceled')) THEN 'failed'
                 ELSE 'completed' END,
    unfinished = :unfinished,
    result = (SELECT coalesce(jsonb_object_agg(s.name, s.result), '{{}}'::jsonb) FROM {step} AS s
              WHERE s.run_id = r.id AND s.parent IS NULL AND s.spec -> 'downstream' = '[]'::jsonb),
    finished_time = now()
WHERE r.id = :run_id
RETURNING r.state, pg_notify(:channel, r.state)
"""


def combine(statements: list[str]) -> str:
    """Several writes as one statement (one round trip): all but the last become CTEs.

    PostgreSQL runs every data-modifying CTE, referenced or not, on one
    snapshot; the statements must therefore write different rows, and none may
    read what another writes.
    """
    if len(statements) == 1:
        return statements[0]
    ctes = ",\n".join(f"w{i} AS ({sql.strip()})" for i, sql in enumerate(statements[:-1]))
    return f"WITH {ctes}\n{statements[-1].strip()}"
