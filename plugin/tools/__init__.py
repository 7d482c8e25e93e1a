"""Tools for people around the node: the OHIF viewer on one origin and the federated job's HTML report."""
