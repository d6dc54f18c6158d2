"""Start of the agent's serving process: ``python -I -S .../keyagent/_serve.py FD``.

Run by :func:`keyagent.daemon.exec_core`; see :mod:`keyagent.core`. ``-I`` leaves this
file's directory off ``sys.path``, so the package's parent goes there first.
"""

import sys

sys.path.insert(0, __file__.rsplit("/", 2)[0])

from keyagent.core import main

sys.exit(main(sys.argv[1:]))
