"""Benchmarks: `make bench` (or `python -m bench NAME ...`). Each prints its figures and a
ratio against a baseline measured in the same run, on this machine."""
