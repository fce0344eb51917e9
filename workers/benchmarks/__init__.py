"""Benchmarks that print figures (speed and cost targets live here, not in timed tests)."""
