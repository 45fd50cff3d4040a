"""Fault-injection tests: workers in real processes, killed, paused, cut off from the database."""
