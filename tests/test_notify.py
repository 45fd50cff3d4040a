"""The dispatcher's self-pipe (``_notify.Waker``): no wake-up is ever lost."""

from __future__ import annotations

import select
import threading
import time

from psycopg2_mq._notify import Waker


def test_no_wake_up_is_lost_under_racing_wakers_and_drains() -> None:
    """Every change a waker announces is seen without waiting for a timeout.

    Two threads change a counter and call ``wake()`` as fast as they can while
    the consumer sleeps in ``select()`` and drains, as the dispatcher does. A
    ``select()`` that times out while the counter has moved on from what the
    consumer last saw is a lost wake-up. (Clearing the pending flag before
    reading the pipe lost one within milliseconds here.)
    """
    waker = Waker()
    counter = [0]
    stop = threading.Event()

    def wake_loop() -> None:
        while not stop.is_set():
            counter[0] += 1
            waker.wake()
            if counter[0] % 64 == 0:
                time.sleep(0)  # let the consumer in at many different points

    threads = [threading.Thread(target=wake_loop, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    lost = 0
    seen = 0
    deadline = time.monotonic() + 2.0
    try:
        while time.monotonic() < deadline:
            readable, _, _ = select.select([waker], [], [], 0.2)
            if readable:
                waker.drain()
            elif counter[0] != seen:
                lost += 1
            seen = counter[0]
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        waker.close()
    assert lost == 0
