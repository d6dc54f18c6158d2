"""Build step only: metadata and options live in pyproject.toml.

The manual pages are rendered at build time from the parsers in keyagent.cli and
keyagent.daemon ([tool.build_manpages] in pyproject.toml), which argparse-manpage imports by
module name. Whether a PEP 517 build puts the source tree on sys.path depends on the pip
that runs it (the pip a fresh venv comes with does not), so this file puts it there.
"""

import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
setup()
