"""The ``steering`` command: a thin layer over the Python API.

- ``parser``: the argument parser (one sub-command per job); :func:`main`, which turns any input
  error into one line naming the file, key or option (exit status 2); and :func:`run`, the
  process's entry point (``main`` with the imports' objects kept out of the garbage collector).
- ``commands``: one function per sub-command, each mapping its arguments onto the library.
- ``args``: value types that argparse refuses with the option's name, the output guard, and
  SafeInfer's option group.
"""

from .parser import build_parser, main, run

__all__ = ["build_parser", "main", "run"]
