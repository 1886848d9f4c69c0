"""Retriable tasks, grouped by the system they touch. Only this package imports system clients."""
