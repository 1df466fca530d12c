"""Benchmarks: scripts that print figures (speed, size); no assertions."""
