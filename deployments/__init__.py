"""Turning prefect.yaml into served deployments, and the one-command local platform."""
