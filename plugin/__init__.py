"""radfed.plugin: the hospital node (Orthanc edge, job ledger, write-back, HTTP API, CLI).

Importing this package must stay cheap: no torch, opacus or flwr at import time.
"""
