"""``python -m radfed`` is the ``radfed`` command."""

import sys

from radfed.plugin.cli import main

sys.exit(main())
