"""Where intensity landmarks are taken (shared by preprocessing and the federation's message allow-list;
kept apart so that the ClientApp process need not import scipy).

Percentiles of each channel's foreground, as in Nyul & Udupa's piecewise-linear standardisation."""

LANDMARK_PERCENTILES: tuple[float, ...] = (1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0)
