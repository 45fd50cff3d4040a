"""LISTEN/NOTIFY: how workers are woken instead of polling.

A queue's channel is ``mq_`` + md5(queue name): always a valid identifier
under PostgreSQL's 63-byte limit, whatever the queue is called (``Mail.Outbox``,
quotes, spaces, unicode). ``model.channel_sql`` computes the same in SQL, for
the NOTIFYs sent by triggers and by the completion statement.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
from collections.abc import Iterable
from typing import Any


def channel_for(queue: str) -> str:
    """The NOTIFY channel of ``queue``."""
    return "mq_" + hashlib.md5(queue.encode("utf-8")).hexdigest()


def listen(conn: Any, queues: Iterable[str]) -> None:
    """Subscribe an autocommit psycopg2 connection to the channels of ``queues``."""
    with conn.cursor() as cur:
        for queue in queues:
            cur.execute(f'LISTEN "{channel_for(queue)}"')


class Waker:
    """A self-pipe: lets other threads interrupt the dispatcher's ``select()``.

    While a wake-up is pending (written, not yet drained) further ones write
    nothing: under load every finished job asks for one, and a write per job
    was a measurable share of a draining worker's time.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._pending = False

    def fileno(self) -> int:
        return self._read

    def wake(self) -> None:
        if self._pending:
            return
        self._pending = True
        with contextlib.suppress(BlockingIOError):  # pipe full: a wake-up is pending anyway
            os.write(self._write, b"x")

    def drain(self) -> None:
        # Cleared after reading, never before: cleared first, the read could
        # swallow the byte of a wake() that came in between, leaving the flag
        # set and the pipe empty, and every later wake() a no-op (a worker
        # then sat idle with jobs due). A wake() skipped because the flag was
        # still set came before the caller looks at its state again.
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read, 4096):
                pass
        self._pending = False

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)


def wait(conn: Any, waker: Waker, timeout: float | None) -> bool:
    """Block until a notification arrives on ``conn``, the waker fires, or the timeout.

    Returns True if ``conn`` received notifications (they are consumed here:
    any notification just means "look again").
    """
    if conn.notifies:
        # read while the dispatcher ran a statement: the socket is quiet now
        conn.notifies.clear()
        return True
    readable, _, _ = select.select([conn, waker], [], [], timeout)
    if waker in readable:
        waker.drain()
    notified = False
    if conn in readable:
        conn.poll()
    if conn.notifies:
        notified = True
        conn.notifies.clear()
    return notified
