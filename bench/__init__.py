"""radfed benchmarks: each prints a table and the command that reproduces it."""
