"""Start of an HTTP worker process: ``python -I -S .../keyagent/_http_worker.py FD``.

Run by :class:`keyagent.proxy_pool.ProxyPool`; see :mod:`keyagent.proxy_worker`. As for
``_serve.py``, ``-I`` keeps this file's directory off ``sys.path`` and the package's parent
goes after the standard library; :func:`keyagent.proxy_worker.main` then takes the agent's
search path.
"""

import sys

sys.path.append(__file__.rsplit("/", 2)[0])

from keyagent.proxy_worker import main

sys.exit(main(sys.argv[1:]))
