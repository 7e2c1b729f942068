"""Entry point of ``python -m asyncmomentum.applications.sweep [options]``.

The same as ``asyncmomentum sweep [options]``.
"""

import argparse

from asyncmomentum.applications.sweep.command import DESCRIPTION, add_arguments

parser = argparse.ArgumentParser(prog="asyncmomentum sweep", description=DESCRIPTION)
add_arguments(parser)
arguments = parser.parse_args()
raise SystemExit(arguments.handler(arguments))
