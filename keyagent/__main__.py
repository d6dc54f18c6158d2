"""``python -m keyagent``: the same as ``keyagent-ctl``."""

import sys

from keyagent.cli import main

sys.exit(main())
