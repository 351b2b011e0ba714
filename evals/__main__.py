import sys

from evals.cli import command

sys.exit(command())
