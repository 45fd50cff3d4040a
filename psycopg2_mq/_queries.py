"""The SQL the worker runs, in one place.

Each statement is one round trip, run in autocommit mode, so it is also one
transaction: there is no window in which a worker holds a half-done change.
Parameters use psycopg2's ``%(name)s`` style; ``{job}``, ``{cursor}`` and
``{worker}`` are the model's table names.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from .model import Model, channel_sql

# What a claim writes onto a job (``j``) and returns, shared by CLAIM_JOBS and
# FINISH_JOB_HANDING_OVER: running under %(worker_id)s, the next attempt, and
# the effective policy (the call's own, else the queue's from %(policies)s,
# else the defaults), written so that any worker can later apply it.
_CLAIM_SET = """    SET state = 'running', start_time = now(), end_time = NULL,
        worker_id = %(worker_id)s, attempts = j.attempts + 1,
        max_attempts = coalesce(j.max_attempts, (%(policies)s::jsonb -> j.queue ->> 'max_attempts')::int, 1),
        lost_policy = coalesce(j.lost_policy, %(policies)s::jsonb -> j.queue ->> 'lost', 'hold'),
        -- LEAST: a row written past MQSource's checks must not make every claim
        -- fail (and LEAST skips NULLs, hence the CASE for "no timeout")
        deadline = CASE
            WHEN coalesce(j.timeout, (%(policies)s::jsonb -> j.queue ->> 'timeout')::float8) IS NULL THEN NULL
            ELSE now() + make_interval(secs => LEAST(
                coalesce(j.timeout, (%(policies)s::jsonb -> j.queue ->> 'timeout')::float8), 3.2e8))
        END"""
# (the order _executor.job_from_row reads; ``cursor`` is filled in afterwards)
_CLAIM_RETURNING = """    RETURNING j.id, j.queue, j.method, j.args, j.cursor_key, j.trace, j.attempts, j.scheduled_time,
        NULL::jsonb AS cursor, j.max_attempts, j.backoff,
        EXTRACT(EPOCH FROM j.deadline - j.start_time)::float8 AS timeout"""

# Claim up to %(limit)s due jobs of the worker's queues.
#
# Why it is safe under concurrency:
# * FOR UPDATE SKIP LOCKED: two workers never lock the same pending row; a row
#   claimed meanwhile fails the re-check of ``state = 'pending'`` and is skipped.
# * A job of a cursor is a candidate only if no job holds the cursor (running
#   or lost) and it is the cursor's head: no pending job of the cursor, in any
#   queue, comes before it in (scheduled_time, id) order. So a cursor's jobs
#   run one at a time and in turn, and a claim takes at most one per cursor.
#   A claim also takes a
#   transaction-scoped try-lock on each candidate's cursor (class
#   -%(lock_class)s), so two claims in flight never pick jobs of one cursor:
#   without it, two claims taking jobs of cursors x and y in opposite orders
#   deadlock on the unique index, which PostgreSQL breaks only after
#   deadlock_timeout. Should a claim still race onto a cursor from a stale
#   snapshot (only with non-collapsible jobs), the unique index
#   ``uq_mq_job_active_cursor`` rejects it at once and the worker claims again.
# * ``scheduled_time <= now()`` and ``start_time = now()`` use the same database
#   clock, so no job starts before its ``when``.
# * ``attempts + 1`` is the fencing token the completion must present.
# * The effective policy (the call's own, else the queue's from %(policies)s,
#   else the defaults) is written onto the row, so that any worker can later
#   apply it to this attempt without knowing the queue.
#
# * Durability: a claim of jobs without a cursor commits with
#   ``synchronous_commit = off`` (``set_config`` in ``durability``): it skips
#   a WAL flush, the largest part of pickup latency. Only a crash of
#   PostgreSQL itself (not a restart, which flushes the WAL) within about
#   ``wal_writer_delay`` can undo such a claim: the job is then pending again
#   and runs again, which at-least-once delivery allows, and the first run's
#   outcome is fenced like any other. The next durable commit on the server
#   (the job's own completion, at the latest) makes the claim durable too. A
#   claim holding a cursor's job keeps the server's setting, so a cursor's
#   jobs never run side by side, crash or not.
#
# Speed: ``h.cursor_key IS NOT NULL`` is for the planner: the generic plan turns
# the first NOT EXISTS into a hashed subplan, which can use the partial index
# ``uq_mq_job_active_cursor`` (cursor keys only) only if its query says so; it
# scanned the whole table without.
# The LATERAL per queue walks the partial index ``ix_mq_job_claim``
# (pending rows only) in (scheduled_time, id) order and stops after %(limit)s.
# The worker runs it as a prepared statement with a generic plan (planning
# it each time cost more than running it); ``id = ANY(ARRAY(...))`` keeps
# that plan on the primary key: a join to ``chosen`` got a generic plan that
# hashed the whole table.
CLAIM_JOBS = """
WITH candidates AS (
    SELECT c.id, c.cursor_key, c.scheduled_time
    FROM unnest(%(queues)s::text[]) AS q(name)
    CROSS JOIN LATERAL (
        SELECT j.id, j.cursor_key, j.scheduled_time
        FROM {job} AS j
        WHERE j.state = 'pending' AND j.queue = q.name AND j.scheduled_time <= now()
          AND (j.cursor_key IS NULL OR (
                NOT EXISTS (
                    SELECT 1 FROM {job} AS h
                    WHERE h.cursor_key = j.cursor_key AND h.cursor_key IS NOT NULL AND h.state IN ('running', 'lost'))
                AND NOT EXISTS (
                    SELECT 1 FROM {job} AS e
                    WHERE e.cursor_key = j.cursor_key AND e.state = 'pending'
                      AND (e.scheduled_time, e.id) < (j.scheduled_time, j.id))
                AND pg_try_advisory_xact_lock(-%(lock_class)s, hashtext(j.cursor_key))))
        ORDER BY j.scheduled_time, j.id
        LIMIT %(limit)s
        FOR UPDATE OF j SKIP LOCKED
    ) AS c
),
chosen AS (
    SELECT id FROM candidates ORDER BY scheduled_time, id LIMIT %(limit)s
),
claimed AS (
    UPDATE {job} AS j
{claim_set}
    WHERE j.id = ANY (ARRAY(SELECT id FROM chosen))
{claim_returning}
),
durability AS (
    SELECT set_config('synchronous_commit', CASE WHEN bool_or(cursor_key IS NOT NULL)
                                                 THEN current_setting('synchronous_commit') ELSE 'off' END, true)
    FROM claimed
)
SELECT claimed.* FROM claimed CROSS JOIN durability ORDER BY scheduled_time, id
"""

# The data of the claimed jobs' cursors. Deliberately a statement of its own,
# run after the claim: the claim may run on a snapshot taken before the
# previous job of a cursor finished (a non-collapsible job can then be claimed
# the moment that job completes, which the unique index rightly allows), and
# reading the cursor from that snapshot would lose the previous job's update.
# A new statement sees every job that finished before this claim.
READ_CURSORS = """
SELECT key, properties FROM {cursor} WHERE key = ANY(%(keys)s::text[])
"""

# Seconds until the next job of these queues may be claimed (<= 0: one is due
# now but was locked by another claim), or NULL when nothing is pending.
# Jobs blocked by their cursor are left out: freeing a cursor sends a NOTIFY.
SECONDS_UNTIL_NEXT_JOB = """
SELECT EXTRACT(EPOCH FROM (min(nxt.scheduled_time) - clock_timestamp()))::float8
FROM unnest(%(queues)s::text[]) AS q(name)
CROSS JOIN LATERAL (
    SELECT j.scheduled_time FROM {job} AS j
    WHERE j.state = 'pending' AND j.queue = q.name
      AND (j.cursor_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM {job} AS h
            WHERE h.cursor_key = j.cursor_key AND h.cursor_key IS NOT NULL AND h.state IN ('running', 'lost')))
    ORDER BY j.scheduled_time, j.id
    LIMIT 1
) AS nxt
"""

# Finish a claimed job: its state and result, its cursor (when %(cursor)s is
# not NULL) and a NOTIFY for the next job waiting on that cursor, in one
# statement and so one transaction. A job inserted on the cursor while this
# statement runs is not in its snapshot; the NOTIFY of the job's own queue
# covers the usual case of that job being of the same queue (its workers then
# claim it), the safety poll the rest.
#
# Fencing: the UPDATE matches only while the job is still ``running`` with the
# attempt this worker claimed; a worker presumed dead (its job marked lost, or
# retried and claimed again) matches nothing and writes nothing, cursor included.
_FINISH_ONE = """
WITH done AS (
    UPDATE {job}
    SET state = %(state)s, result = %(result)s::jsonb, end_time = now()
    WHERE id = %(id)s AND state = 'running' AND attempts = %(attempt)s
    RETURNING queue, cursor_key
),
saved AS (
    INSERT INTO {cursor} AS cu (key, properties, updated_time)
    SELECT done.cursor_key, %(cursor)s::jsonb, now() FROM done
    WHERE done.cursor_key IS NOT NULL AND %(cursor)s::jsonb IS NOT NULL
    ON CONFLICT (key) DO UPDATE SET properties = excluded.properties, updated_time = excluded.updated_time
    RETURNING properties
),"""

# wakes the workers of the queues with a job pending on the freed cursor
_WOKEN = """
woken AS (
    SELECT pg_notify({channel}, '') FROM (
        SELECT p.queue FROM {job} AS p JOIN done ON p.cursor_key = done.cursor_key
        WHERE p.state = 'pending'
        UNION
        SELECT done.queue FROM done WHERE done.cursor_key IS NOT NULL
    ) AS p"""

FINISH_JOB = (
    _FINISH_ONE
    + _WOKEN
    + """
)
SELECT (SELECT count(*) FROM done), (SELECT count(*) FROM saved), (SELECT count(*) FROM woken)
"""
)

# FINISH_JOB that also claims the next job of the finished job's cursor, when
# it is this worker's to run now: the cursor's head (the first pending job of
# the cursor, in any queue, in (scheduled_time, id) order) is due, of a queue
# in %(queues)s, not locked, and its cursor try-lock (as in CLAIM_JOBS) is
# free. The cursor goes from one job to the next in one transaction, so there
# is no NOTIFY, wake-up, claim and cursor read between them: the hop of a
# cursor chain is one round trip and one WAL flush. The next job's cursor data
# is the one this statement saves, else the stored one (nothing else can have
# written it: the finished job held the cursor).
#
# Within the statement the finished job leaves the running state before the
# next job enters it (``next_job`` reads ``done``), so uq_mq_job_active_cursor
# sees one running job of the cursor at a time. The worker takes the claimed
# job into its own set before maintenance can look (see ExecutorPool.handing_over).
FINISH_JOB_HANDING_OVER = (
    _FINISH_ONE
    + """
head AS (
    SELECT n.id FROM {job} AS n JOIN done ON n.cursor_key = done.cursor_key
    WHERE n.state = 'pending'
    ORDER BY n.scheduled_time, n.id
    LIMIT 1
),
next_job AS (
    SELECT n.id FROM {job} AS n JOIN head ON n.id = head.id
    WHERE n.state = 'pending' AND n.scheduled_time <= now() AND n.queue = ANY(%(queues)s::text[])
      AND pg_try_advisory_xact_lock(-%(lock_class)s, hashtext(n.cursor_key))
    FOR UPDATE OF n SKIP LOCKED
),
claimed AS (
    UPDATE {job} AS j
{claim_set}
    WHERE j.id = (SELECT id FROM next_job)
{claim_returning}
),"""
    + _WOKEN
    + """
    WHERE NOT EXISTS (SELECT FROM claimed)
)
SELECT (SELECT count(*) FROM done), (SELECT count(*) FROM saved), (SELECT count(*) FROM woken),
       claimed.*,
       coalesce((SELECT properties FROM saved),
                (SELECT cu.properties FROM {cursor} AS cu WHERE cu.key = claimed.cursor_key), '{{}}'::jsonb)
FROM (SELECT) AS one LEFT JOIN claimed ON true
"""
)

# FINISH_JOB for a batch: %(outcomes)s is a JSON array of
# {id, attempt, state, result, cursor?} (cursor present only when it is to be
# saved). One statement and one commit for every outcome that was waiting.
# Two outcomes of a batch never share a cursor: both jobs would have had to be
# running at once, which uq_mq_job_active_cursor forbids.
FINISH_JOBS = """
WITH outcome AS MATERIALIZED (
    SELECT (o->>'id')::bigint AS id, (o->>'attempt')::int AS attempt, o->>'state' AS state,
           o->'result' AS result, o->'cursor' AS cursor
    FROM jsonb_array_elements(%(outcomes)s::jsonb) AS o
),
done AS (
    UPDATE {job} AS j
    SET state = o.state, result = o.result, end_time = now()
    FROM outcome AS o
    WHERE j.id = o.id AND j.state = 'running' AND j.attempts = o.attempt
    RETURNING j.id, j.queue, j.cursor_key
),
saved AS (
    INSERT INTO {cursor} AS cu (key, properties, updated_time)
    SELECT done.cursor_key, o.cursor, now() FROM done JOIN outcome AS o ON o.id = done.id
    WHERE done.cursor_key IS NOT NULL AND o.cursor IS NOT NULL
    ON CONFLICT (key) DO UPDATE SET properties = excluded.properties, updated_time = excluded.updated_time
    RETURNING 1
),
woken AS (
    SELECT pg_notify({channel}, '') FROM (
        SELECT p.queue FROM {job} AS p JOIN done ON p.cursor_key = done.cursor_key
        WHERE p.state = 'pending'
        UNION
        SELECT done.queue FROM done WHERE done.cursor_key IS NOT NULL
    ) AS p
)
SELECT array(SELECT id FROM done), (SELECT count(*) FROM saved), (SELECT count(*) FROM woken)
"""

# Put a failed (or snoozed) attempt back to pending, %(delay)s seconds from now,
# keeping its error in ``errors``; fenced like FINISH_JOB. The job stops being
# collapsible if another collapsible job is pending on its cursor meanwhile
# (the unique index allows only one). The NOTIFY tells workers of its new time
# and wakes the next job on its cursor, which it no longer holds.
RETRY_JOB = """
WITH done AS (
    UPDATE {job} AS j
    SET state = 'pending', scheduled_time = now() + make_interval(secs => %(delay)s),
        start_time = NULL, end_time = NULL, worker_id = NULL, deadline = NULL,
        max_attempts = j.max_attempts + %(extra_attempts)s,
        errors = coalesce(j.errors, '[]'::jsonb) || jsonb_build_array(%(error)s::jsonb || jsonb_build_object(
            'attempt', j.attempts, 'start_time', j.start_time, 'end_time', now())),
        collapsible = j.collapsible AND NOT EXISTS (
            SELECT 1 FROM {job} AS p
            WHERE p.cursor_key = j.cursor_key AND p.state = 'pending' AND p.collapsible)
    WHERE j.id = %(id)s AND j.state = 'running' AND j.attempts = %(attempt)s
    RETURNING j.queue, j.cursor_key
),
woken AS (
    SELECT pg_notify({channel}, '') FROM (
        SELECT done.queue FROM done
        UNION
        SELECT p.queue FROM {job} AS p JOIN done ON p.cursor_key = done.cursor_key WHERE p.state = 'pending'
    ) AS p
)
SELECT (SELECT count(*) FROM done), (SELECT count(*) FROM woken)
"""

# Register a worker and take its liveness lock in the same statement, so no
# other worker can ever see the row without the lock being held.
REGISTER_WORKER = """
INSERT INTO {worker} (name, host, pid, queues)
VALUES (%(name)s, %(host)s, %(pid)s, %(queues)s::jsonb)
RETURNING id, pg_advisory_lock(%(lock_class)s, id::int) IS NULL
"""

UNREGISTER_WORKER = """
WITH gone AS (DELETE FROM {worker} WHERE id = %(worker_id)s)
SELECT pg_advisory_unlock(%(lock_class)s, %(worker_id)s::int)
"""


def _release_jobs(victims: str) -> str:
    """SQL that takes running jobs away from their attempt, per their policy.

    ``victims`` is a CTE named ``victims`` selecting (id, outcome, error) of
    running jobs, locked with SKIP LOCKED so that concurrent maintenance passes
    never take the same job twice. ``outcome`` is pending (retry now), failed or
    lost. Retried and failed jobs free their cursor: a NOTIFY wakes the queue
    of the job that waits on it, and the queues of retried jobs.
    """
    return (
        victims
        + """,
released AS (
    UPDATE {job} AS j SET
        state = v.outcome,
        result = CASE WHEN v.outcome = 'failed' THEN jsonb_build_object('error', v.error) ELSE j.result END,
        errors = CASE WHEN v.outcome = 'pending' THEN coalesce(j.errors, '[]'::jsonb) || jsonb_build_array(v.error)
                      ELSE j.errors END,
        scheduled_time = CASE WHEN v.outcome = 'pending' THEN now() ELSE j.scheduled_time END,
        start_time = CASE WHEN v.outcome = 'pending' THEN NULL ELSE j.start_time END,
        end_time = CASE WHEN v.outcome = 'pending' THEN NULL ELSE now() END,
        worker_id = CASE WHEN v.outcome = 'pending' THEN NULL ELSE j.worker_id END,
        deadline = NULL,
        collapsible = CASE WHEN v.outcome = 'pending' THEN j.collapsible AND NOT EXISTS (
            SELECT 1 FROM {job} AS p
            WHERE p.cursor_key = j.cursor_key AND p.state = 'pending' AND p.collapsible) ELSE j.collapsible END
    FROM victims AS v
    WHERE j.id = v.id
    RETURNING j.id, j.state, j.queue, j.cursor_key
),
woken AS (
    SELECT pg_notify({channel}, '') FROM (
        SELECT r.queue FROM released AS r WHERE r.state = 'pending'
        UNION
        SELECT p.queue FROM {job} AS p JOIN released AS r ON p.cursor_key = r.cursor_key
        WHERE r.state IN ('failed', 'pending') AND p.state = 'pending'
    ) AS p
)
SELECT coalesce(jsonb_object_agg(r.id, r.state), '{{}}'::jsonb), (SELECT count(*) FROM woken)
FROM released AS r
"""
    )


#: what a running job whose attempt is abandoned becomes, per its lost policy
_LOST_POLICY_OUTCOME = """CASE WHEN j.lost_policy = 'retry' AND j.attempts < j.max_attempts THEN 'pending'
             WHEN j.lost_policy IN ('retry', 'fail') THEN 'failed'
             ELSE 'lost' END AS outcome"""


def _attempt_error(kind: str, message: str) -> str:
    return f"""jsonb_build_object('type', '{kind}', 'message', {message}, 'attempt', j.attempts,
               'start_time', j.start_time, 'end_time', now())"""


# The running jobs whose worker no longer holds its advisory lock: PostgreSQL
# released it when the worker's session ended (process killed, connection
# dropped). A live worker always holds the lock before it claims, on the very
# connection it claims with, so a running job of a live worker is never
# matched. A worker whose lock is free is first only marked ``missing_since``;
# its jobs are released once that has lasted %(lost_after)s seconds, so that a
# worker reconnecting after a blip or a database restart keeps its jobs. (The
# mark set here is not visible to ``victims`` in the same statement: a worker
# is never released on the pass that first finds it missing.) Each released
# job is retried, failed or held as ``lost`` per its lost policy.
MARK_LOST_JOBS = _release_jobs(
    """
WITH alive AS MATERIALIZED (
    SELECT l.objid::bigint AS worker_id FROM pg_locks AS l
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
      AND l.classid = %(lock_class)s::bigint::oid
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
),
missing AS (
    UPDATE {worker} AS w SET missing_since = now()
    WHERE w.missing_since IS NULL AND w.id NOT IN (SELECT worker_id FROM alive)
    RETURNING w.id
),
victims AS (
    SELECT j.id,
        """
    + _LOST_POLICY_OUTCOME
    + """,
        """
    + _attempt_error("LostJob", "'the worker running this job died'")
    + """ AS error
    FROM {job} AS j
    WHERE j.state = 'running' AND j.worker_id NOT IN (SELECT worker_id FROM alive)
      AND NOT EXISTS (
            SELECT 1 FROM {worker} AS w
            WHERE w.id = j.worker_id
              AND (w.missing_since IS NULL OR w.missing_since > now() - make_interval(secs => %(lost_after)s)))
    FOR UPDATE OF j SKIP LOCKED
)"""
)

# The running jobs of a live worker that the worker does not know it has: a
# claim that committed but whose reply never arrived (the connection broke in
# between), or an outcome the completer gave up writing. The worker itself
# runs this, with the ids it does hold (%(owned)s), on the connection that
# claims, so no claim of its own is in flight meanwhile. They are released
# like the jobs of a dead worker, per their lost policy.
RELEASE_ORPHANED_JOBS = _release_jobs(
    """
WITH victims AS (
    SELECT j.id,
        """
    + _LOST_POLICY_OUTCOME
    + """,
        """
    + _attempt_error("LostJob", "'its worker lost track of it (a reply from the database was lost)'")
    + """ AS error
    FROM {job} AS j
    WHERE j.state = 'running' AND j.worker_id = %(worker_id)s AND NOT (j.id = ANY(%(owned)s::bigint[]))
    FOR UPDATE OF j SKIP LOCKED
)"""
)

# Running attempts past their deadline: retried at once while attempts are
# left, else failed. The thread still running the job cannot be stopped; its
# outcome is fenced off when it ends.
EXPIRE_JOBS = _release_jobs(
    """
WITH victims AS (
    SELECT j.id,
        CASE WHEN j.attempts < j.max_attempts THEN 'pending' ELSE 'failed' END AS outcome,
        """
    + _attempt_error(
        "JobTimeout", "format('attempt %%s ran past its timeout of %%s s', j.attempts, j.timeout)"
    )
    + """ AS error
    FROM {job} AS j
    WHERE j.state = 'running' AND j.deadline < now()
    FOR UPDATE OF j SKIP LOCKED
)"""
)

# Forget the registry rows of dead workers once none of their jobs is running.
FORGET_DEAD_WORKERS = """
DELETE FROM {worker} AS w
WHERE w.missing_since < now() - make_interval(secs => %(lost_after)s)
  AND NOT EXISTS (SELECT 1 FROM {job} AS j WHERE j.worker_id = w.id AND j.state = 'running')
"""

# After a reconnect: the worker got its lock back, so it is not missing.
REJOIN_WORKER = """
WITH back AS (UPDATE {worker} SET missing_since = NULL WHERE id = %(worker_id)s RETURNING id)
INSERT INTO {worker} (id, name, host, pid, queues)
SELECT %(worker_id)s, %(name)s, %(host)s, %(pid)s, %(queues)s::jsonb
WHERE NOT EXISTS (SELECT 1 FROM back)
ON CONFLICT (id) DO NOTHING
"""

# Delete up to %(batch)s finished jobs of one state older than %(age)s seconds.
# Small batches with SKIP LOCKED: no long lock, no contention between workers.
# Cursors are kept.
PRUNE_JOBS = """
WITH doomed AS (
    SELECT id FROM {job}
    WHERE state = %(state)s AND end_time < now() - make_interval(secs => %(age)s)
    ORDER BY end_time
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM {job} AS j USING doomed WHERE j.id = doomed.id
"""


def _table_sql(table: sa.Table) -> str:
    if table.schema:
        return f'"{table.schema}"."{table.name}"'
    return table.name


@dataclass(frozen=True)
class Prepared:
    """A statement of this module as a prepared statement: ``PREPARE`` once per
    connection, then ``execute`` with the same ``%(name)s`` parameters.

    Prepared with ``plan_cache_mode = force_generic_plan`` in mind: the worker's
    hot statements take longer to plan for their parameters than to run, and
    their plans do not depend on them.
    """

    prepare: str
    execute: str

    @classmethod
    def of(cls, name: str, sql: str, params: tuple[tuple[str, str], ...]) -> Prepared:
        """``params``: (parameter name, SQL type) in $n order."""
        for n, (param, _) in enumerate(params, start=1):
            sql = sql.replace(f"%({param})s", f"${n}")
        types = ", ".join(sql_type for _, sql_type in params)
        placeholders = ", ".join(f"%({param})s" for param, _ in params)
        return cls(
            prepare=f"PREPARE {name} ({types}) AS {sql}".replace("%%", "%"),
            execute=f"EXECUTE {name} ({placeholders})",
        )


#: parameters and their types, in $n order, of the statements the worker prepares
_CLAIM_PARAMS = (
    ("queues", "text[]"),
    ("limit", "integer"),
    ("worker_id", "integer"),
    ("policies", "text"),
    ("lock_class", "integer"),
)
_HANDING_OVER_PARAMS = (
    ("id", "bigint"),
    ("attempt", "integer"),
    ("state", "text"),
    ("result", "text"),
    ("cursor", "text"),
    ("queues", "text[]"),
    ("worker_id", "integer"),
    ("policies", "text"),
    ("lock_class", "integer"),
)


@dataclass(frozen=True)
class Queries:
    """The statements above, with the model's table names filled in."""

    claim_jobs: str
    claim_jobs_prepared: Prepared
    finish_job_handing_over_prepared: Prepared
    read_cursors: str
    seconds_until_next_job: str
    finish_job: str
    finish_jobs: str
    retry_job: str
    register_worker: str
    rejoin_worker: str
    unregister_worker: str
    mark_lost_jobs: str
    release_orphaned_jobs: str
    expire_jobs: str
    forget_dead_workers: str
    prune_jobs: str

    @classmethod
    def for_model(cls, model: Model) -> Queries:
        names = {
            "job": _table_sql(model.job_table),
            "cursor": _table_sql(model.cursor_table),
            "worker": _table_sql(model.worker_table),
            "channel": channel_sql("p.queue"),
            "claim_set": _CLAIM_SET,
            "claim_returning": _CLAIM_RETURNING,
        }
        claim_jobs = CLAIM_JOBS.format(**names)
        finish_job_handing_over = FINISH_JOB_HANDING_OVER.format(**names)
        return cls(
            claim_jobs=claim_jobs,
            claim_jobs_prepared=Prepared.of("mq_claim_jobs", claim_jobs, _CLAIM_PARAMS),
            finish_job_handing_over_prepared=Prepared.of(
                "mq_finish_job_handing_over", finish_job_handing_over, _HANDING_OVER_PARAMS
            ),
            read_cursors=READ_CURSORS.format(**names),
            seconds_until_next_job=SECONDS_UNTIL_NEXT_JOB.format(**names),
            finish_job=FINISH_JOB.format(**names),
            finish_jobs=FINISH_JOBS.format(**names),
            retry_job=RETRY_JOB.format(**names),
            register_worker=REGISTER_WORKER.format(**names),
            rejoin_worker=REJOIN_WORKER.format(**names),
            unregister_worker=UNREGISTER_WORKER.format(**names),
            mark_lost_jobs=MARK_LOST_JOBS.format(**names),
            release_orphaned_jobs=RELEASE_ORPHANED_JOBS.format(**names),
            expire_jobs=EXPIRE_JOBS.format(**names),
            forget_dead_workers=FORGET_DEAD_WORKERS.format(**names),
            prune_jobs=PRUNE_JOBS.format(**names),
        )
