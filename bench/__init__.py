"""Benchmarks: `make bench`. They print figures; they never assert timings."""
