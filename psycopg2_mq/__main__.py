"""``python -m psycopg2_mq``: see :mod:`psycopg2_mq.cli`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
