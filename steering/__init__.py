"""steering: steer causal LMs towards safety without training them.

A small public surface; nothing heavy happens at import.
"""

from ._version import __version__

from . import datasets, edits, evaluate, judge, skills, testing
from .arch import ArchitectureError, ArchSpec, known_architectures
from .edits import load_edit
from .hooks import SITES, HookContext, attach
from .model import Model, load, register_scheme
from .record import Recording, record
from .vectors import Candidates, SteeringVector

def _organism_folder(name: str) -> str:
    from .recipe import resolve

    return resolve(name)


register_scheme("organism", _organism_folder)

__all__ = [
    "ArchSpec", "ArchitectureError", "Candidates", "datasets", "edits", "evaluate", "judge", "skills", "testing", "HookContext",
    "Model", "Recording", "SITES", "SteeringVector", "attach", "known_architectures", "load", "load_edit", "record",
    "__version__",
]
