"""Lab tools: a whole federation on loopback, and side-by-side experiments."""
