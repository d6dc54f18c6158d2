"""Start of the agent's serving process: ``python -I -S .../keyagent/_serve.py FD``.

Run by :func:`keyagent.daemon.exec_core`; see :mod:`keyagent.core`. ``-I`` leaves this
file's directory off ``sys.path``, so the package's parent goes after the standard
library (never before it: nothing installed may shadow a standard module);
:func:`keyagent.core.main` then takes the daemon's search path.
"""

import sys

sys.path.append(__file__.rsplit("/", 2)[0])

from keyagent.core import main

sys.exit(main(sys.argv[1:]))
