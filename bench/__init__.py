"""Spaces benchmarks: ``python -m bench <name> [--quick]`` (``make bench`` runs them all).

Each benchmark starts the system under test as real processes on loopback, drives it with
load generators in separate processes, prints a table and writes bench/results/<name>.json.
See docs/benchmarks.md for what each one measures and the recorded results."""
