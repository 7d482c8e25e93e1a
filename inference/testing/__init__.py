"""Synthetic studies and a real Orthanc launcher for tests, benchmarks and the demo; no clinical code imports this."""
