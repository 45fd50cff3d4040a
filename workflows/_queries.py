"""The SQL of the workflow layer, in one place.

``{run}`` and ``{step}`` are the (quoted, schema-qualified) table names;
parameters use SQLAlchemy's ``:name`` style. Every statement finds its rows by
``wf_run.id`` or by ``wf_step``'s primary key ``(run_id, name)`` (or
``ix_wf_step_parent``), never by scanning a run, except ``LOAD_OPEN_STEPS``
(cancel and the recovery path) and ``RUN_OUTCOME`` (once, when a run ends).
"""

from __future__ import annotations

LOCK_RUN = """
SELECT id, workflow, state, args, coordinator_queue, unfinished FROM {run} WHERE id = :run_id FOR UPDATE
"""

_STEP_COLUMNS = "name, parent, item_index, spec, state, waiting_on, items_left, attempts, job_id"

LOAD_STEPS = f"SELECT {_STEP_COLUMNS} FROM {{step}} WHERE run_id = :run_id AND name = ANY(:names)"

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

# Writes the in-memory changes of many steps in one statement.
SAVE_STEPS = """
UPDATE {step} AS s
SET state = r.state, result = nullif(r.result, 'null'::jsonb), job_id = r.job_id, attempts = r.attempts,
    waiting_on = r.waiting_on, items_left = r.items_left,
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
FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS v(
    name text, parent text, item_index int, spec jsonb, state text, waiting_on int, items_left int,
    attempts int, job_id bigint)
"""

# Count down by :counts[name] (a JSON object); only steps still waiting count
# down, so a replayed advance, or a step canceled meanwhile, is left alone.
COUNT_DOWN_WAITING = """
UPDATE {step} AS s SET waiting_on = s.waiting_on - (CAST(:counts AS jsonb) ->> s.name)::int
WHERE s.run_id = :run_id AND s.name = ANY(:names) AND s.state = 'waiting'
RETURNING s.name, s.waiting_on
"""

COUNT_DOWN_ITEMS = """
UPDATE {step} AS s SET items_left = s.items_left - (CAST(:counts AS jsonb) ->> s.name)::int
WHERE s.run_id = :run_id AND s.name = ANY(:names) AND s.state = 'queued'
RETURNING s.name, s.items_left
"""

SAVE_RUN = """
UPDATE {run} SET state = :state, unfinished = :unfinished, result = CAST(:result AS jsonb),
    finished_time = CASE WHEN :state IN ('completed', 'failed', 'canceled') THEN now() END
WHERE id = :run_id
"""

# Read once per run, when it finishes: the outcome and the sinks' results.
RUN_OUTCOME = """
SELECT name, state, result, spec->'downstream' = '[]'::jsonb AS sink FROM {step}
WHERE run_id = :run_id AND parent IS NULL AND (state IN ('failed', 'canceled') OR spec->'downstream' = '[]'::jsonb)
"""
