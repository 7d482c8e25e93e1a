"""Orthanc: the REST client and its tag names (the launcher for local instances is in
``inference/testing/orthanc_server.py``)."""
