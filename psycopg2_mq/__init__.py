"""psycopg2_mq: a job queue that lives in PostgreSQL."""

from .model import JobStates, Model, make_default_model

__all__ = ["JobStates", "Model", "make_default_model"]
