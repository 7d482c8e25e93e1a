"""A site's processes: the Flower ClientApp, the long-lived site worker, radfed's SuperExec, and a round's work."""
