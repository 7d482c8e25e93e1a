"""Learning, free of Flower: cohorts, networks, training, DP-SGD, evaluation, calibration, aggregation, export, and what
may leave a site."""
