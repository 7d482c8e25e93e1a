"""One federated job's contract between coordinator and sites: its run config, typed records, the plan and the alerts a
round carries."""
