"""Retry, lost-job and timeout policies.

A queue object may carry a ``policy`` attribute (a :class:`JobPolicy`); a call
may override parts of it (``max_attempts``, ``backoff``, ``lost_policy``,
``timeout``). The claiming worker writes the effective values onto the job row,
so that whichever worker later finds the job lost or timed out applies the
same policy without knowing the queue's Python object.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: the longest timeout or delay accepted (about 10 years): beyond, PostgreSQL intervals overflow
MAX_SECONDS = 3.2e8


class LostPolicy:
    """What happens to a job whose worker died (see ``docs/semantics.md``)."""

    #: the job becomes ``lost`` and holds its cursor until retry_job/fail_lost_job
    HOLD = "hold"
    #: back to ``pending`` at once while attempts are left, else ``failed``
    RETRY = "retry"
    #: ``failed`` at once, freeing its cursor
    FAIL = "fail"

    ALL = (HOLD, RETRY, FAIL)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: ``base * factor**(attempt-1)`` seconds, at most ``cap``.

    With ``jitter`` the delay is drawn uniformly from its upper half, so that
    jobs failing together do not come back together.
    """

    base: float = 1.0
    factor: float = 2.0
    cap: float = 300.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.base < 0 or self.factor < 1 or self.cap < 0:
            raise ValueError("Backoff needs base >= 0, factor >= 1 and cap >= 0")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before the attempt after ``attempt`` (1-based)."""
        seconds = min(self.cap, self.base * self.factor ** max(attempt - 1, 0))
        return random.uniform(seconds / 2, seconds) if self.jitter else seconds

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base, "factor": self.factor, "cap": self.cap, "jitter": self.jitter}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Backoff:
        return cls(**{k: data[k] for k in ("base", "factor", "cap", "jitter") if k in data})


#: a custom backoff: attempt number (1-based) -> seconds
BackoffFunction = Callable[[int], float]


@dataclass(frozen=True)
class JobPolicy:
    """A queue's defaults for its jobs.

    ``max_attempts``: runs in all, 1 means no retry. ``backoff``: a
    :class:`Backoff` or a function of the attempt number. ``lost``: a
    :class:`LostPolicy` value. ``timeout``: seconds an attempt may run.
    """

    max_attempts: int = 1
    backoff: Backoff | BackoffFunction = Backoff()
    lost: str = LostPolicy.HOLD
    timeout: float | None = None

    def __post_init__(self) -> None:
        check_policy_values(self.max_attempts, self.lost, self.timeout)

    def retry_delay(self, attempt: int, job_backoff: dict[str, Any] | None = None) -> float:
        """Seconds before retrying after ``attempt`` failed; a call's own backoff wins."""
        if job_backoff is not None:
            return Backoff.from_json(job_backoff).delay(attempt)
        if isinstance(self.backoff, Backoff):
            return self.backoff.delay(attempt)
        return float(self.backoff(attempt))

    def claim_defaults(self) -> dict[str, Any]:
        """What the claim writes onto jobs that did not set their own values."""
        return {"max_attempts": self.max_attempts, "lost": self.lost, "timeout": self.timeout}


def check_policy_values(max_attempts: Any, lost: Any, timeout: Any) -> None:
    """Validate policy values (``None`` means "not set"); raise TypeError/ValueError."""
    if max_attempts is not None:
        if not isinstance(max_attempts, int) or isinstance(max_attempts, bool):
            raise TypeError("max_attempts must be an int")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
    if lost is not None and lost not in LostPolicy.ALL:
        raise ValueError(f"lost policy must be one of {LostPolicy.ALL}, got {lost!r}")
    if timeout is not None:
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
            raise TypeError("timeout must be a number of seconds")
        if not math.isfinite(timeout) or not 0 < timeout <= MAX_SECONDS:
            raise ValueError(f"timeout must be a positive number of seconds, at most {MAX_SECONDS:g}")


DEFAULT_POLICY = JobPolicy()
