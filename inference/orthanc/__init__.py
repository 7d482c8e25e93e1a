"""Orthanc: a REST client and a launcher for local instances (tests, demo, local federation)."""
