"""Benchmarks: commands that print markdown tables (and write CSV/PNG) -- run them as modules,
e.g. `python -m benchmarks.layers --quick`. Timing helpers live in `benchmarks.common`."""
