import sys

from .parser import run

sys.exit(run())
