"""An embedded PostgreSQL for the demo and the examples, when no URL is given.

It uses ``pgserver`` (extra ``embedded``: ``pip install 'psycopg2_mq[embedded]'``),
a pip-installable PostgreSQL: the server runs in a temporary data directory,
listens on a Unix socket only, and is stopped and deleted when the block ends.
Nothing here is part of the queue itself; it only saves a newcomer from
installing a server to try it.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

INSTALL_HINT = (
    "the embedded PostgreSQL needs the optional dependency pgserver: "
    "pip install 'psycopg2_mq[embedded]' -- or pass a database URL instead "
    "(--database-url postgresql+psycopg2://user:password@host/dbname, or set MQ_DATABASE_URL)"
)


class EmbeddedPostgresUnavailable(RuntimeError):
    """``pgserver`` is not installed, or its server could not start."""


def sqlalchemy_url(url: str | sa.URL) -> sa.URL:
    """Parse ``url`` and make it use psycopg2, the driver this library runs on.

    A bare ``postgresql://`` (what ``pgserver`` and most tools print) would
    select whichever driver SQLAlchemy defaults to.
    """
    parsed = sa.make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg2")
    return parsed


@contextmanager
def embedded_postgres() -> Iterator[sa.URL]:
    """Start a throwaway PostgreSQL; yield the SQLAlchemy URL of its ``postgres`` database.

    The server is stopped and its data directory removed when the block exits,
    however it exits.
    """
    with warnings.catch_warnings():
        # platformdirs warns about an unset XDG_RUNTIME_DIR on bare machines; harmless here
        warnings.simplefilter("ignore")
        try:
            import pgserver
        except ImportError:
            raise EmbeddedPostgresUnavailable(INSTALL_HINT) from None

    # a short path: the server's Unix socket lives in it and socket paths are limited to ~100 bytes
    datadir = tempfile.mkdtemp(prefix="mq-pg-")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                server = pgserver.get_server(datadir, cleanup_mode="stop")
            except Exception as exc:
                raise EmbeddedPostgresUnavailable(f"the embedded PostgreSQL did not start: {exc}") from exc
        try:
            yield sqlalchemy_url(server.get_uri()).set(database="postgres")
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(datadir, ignore_errors=True)
