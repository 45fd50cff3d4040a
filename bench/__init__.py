"""Benchmarks of the queue against a raw-SQL baseline measured in the same run.

Run ``python3 -m bench --help``; see ``docs/performance.md`` for the figures.
"""
