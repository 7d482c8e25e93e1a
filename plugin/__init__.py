"""radfed.plugin: the hospital node (``node``: Orthanc edge, job ledger, write-back, HTTP API), the ``radfed``
command (``commands``) and the tools around it (``tools``: viewer, report).

Importing this package must stay cheap: no torch, opacus or flwr at import time.
"""
