"""The ``radfed`` command (cli) and one module per larger subcommand: config, init, demo, experiment, federation."""
