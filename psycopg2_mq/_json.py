"""Strict JSON for what goes into ``jsonb`` columns.

PostgreSQL's ``jsonb`` rejects NaN/Infinity and the NUL character, which
Python's ``json`` happily produces; checking here turns a late database error
(after the job ran) into a clear error where the value was made.
"""

from __future__ import annotations

import json
from typing import Any


class NotJSONError(TypeError):
    """A value cannot be stored as JSON."""


#: built once: json.dumps with options builds an encoder per call, a cost per queued job
_ENCODER = json.JSONEncoder(allow_nan=False, ensure_ascii=False, separators=(",", ":"))


def dumps(value: Any, what: str = "value") -> str:
    """Serialize ``value`` for a ``jsonb`` column or raise :class:`NotJSONError`."""
    try:
        text = _ENCODER.encode(value)
    except (TypeError, ValueError) as exc:
        raise NotJSONError(f"{what} must be JSON-serializable: {exc}") from None
    if "\\u0000" in text:
        raise NotJSONError(f"{what} contains a NUL character, which PostgreSQL jsonb cannot store")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise NotJSONError(f"{what} contains a lone surrogate, which is not valid Unicode text") from None
    return text


def scrub(text: str) -> str:
    """Make free text (exception messages, tracebacks) storable in ``jsonb``.

    NUL becomes ``\\x00`` and lone surrogates their ``\\udXXX`` escape.
    """
    text = text.replace("\x00", "\\x00")
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text
