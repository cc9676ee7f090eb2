"""lm-eval task files for :mod:`steering.skills` (``steering_add``, ``steering_sort``,
``steering_reverse``, ``steering_lookup``; tag ``steering_skills``): pass :data:`FOLDER` as
``include_path`` to lm-eval's ``TaskManager`` (``steering.lmeval.evaluate`` does)."""

from pathlib import Path

FOLDER = Path(__file__).resolve().parent
TASKS = ("steering_add", "steering_sort", "steering_reverse", "steering_lookup")
