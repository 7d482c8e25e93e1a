"""``python -m radfed.plugin`` is the ``radfed`` command."""

import sys

from radfed.plugin.commands.cli import main

sys.exit(main())
