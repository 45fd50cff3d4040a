"""A first end-to-end check: a call runs once and its result is stored."""

from psycopg2_mq import JobStates

from .support import RecordingQueue, enqueue, fetch_job, running_worker, wait_until


def test_call_runs_and_stores_result(engine, model):
    queue = RecordingQueue()
    with running_worker(engine, model, {"echo": queue}):
        (job_id,) = enqueue(engine, model, ("echo", "hello", {"name": "Andy"}))
        wait_until(lambda: fetch_job(engine, model, job_id).state == JobStates.COMPLETED)
    job = fetch_job(engine, model, job_id)
    assert job.result == {"echo": {"name": "Andy"}}
    assert queue.ids() == [job_id]
