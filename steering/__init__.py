"""steering: steer causal LMs towards safety without training them.

A small public surface; nothing heavy happens at import.
"""

__version__ = "0.1.0"  # the one version source: pyproject.toml reads it

from . import datasets, edits, evaluate, judge, testing
from .arch import ArchitectureError, ArchSpec, known_architectures
from .edits import load_edit
from .hooks import SITES, HookContext, attach
from .model import Model, load
from .record import Recording, record
from .vectors import Candidates, SteeringVector

__all__ = [
    "ArchSpec", "ArchitectureError", "Candidates", "datasets", "edits", "evaluate", "judge", "testing", "HookContext",
    "Model", "Recording", "SITES", "SteeringVector", "attach", "known_architectures", "load", "load_edit", "record",
    "__version__",
]
