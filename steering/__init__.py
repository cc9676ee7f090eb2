"""steering: steer causal LMs towards safety without training them.

A small public surface; nothing heavy happens at import.
"""

from . import datasets, testing
from .arch import ArchitectureError, ArchSpec, known_architectures
from .hooks import SITES, HookContext, attach
from .model import Model, load
from .record import Recording, record

__version__ = "0.1.0"

__all__ = [
    "ArchSpec", "ArchitectureError", "datasets", "testing", "HookContext", "Model", "Recording", "SITES",
    "attach", "known_architectures", "load", "record", "__version__",
]
