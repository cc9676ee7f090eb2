"""lm-eval task files for :mod:`steering.skills` (``steering_sort``, ``steering_reverse``,
``steering_count``, ``steering_increment``; tag ``steering_skills``): pass :data:`FOLDER` as
``include_path`` to lm-eval's ``TaskManager`` (``steering.lmeval.evaluate`` does)."""

from pathlib import Path

FOLDER = Path(__file__).resolve().parent
TASKS = tuple(f"steering_{k}" for k in ("sort", "reverse", "count", "increment"))  # steering.skills.SKILLS
