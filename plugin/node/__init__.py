"""The hospital node: lifecycle, change follower, examiner, job runner, prefetch, ledger, write-back, SCP, HTTP API,
metrics, config."""
