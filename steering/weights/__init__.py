"""Weights on disk: checkpoints read, edited and written one tensor at a time.

- ``files``: safetensors checkpoints read and written tensor by tensor (:class:`Checkpoint`,
  :class:`ShardWriter`, :func:`write_checkpoint`, provenance); the core's loader uses it, so this
  package's ``__init__`` imports nothing else.
- ``bake``: a model with baked edits written as a Hugging Face folder (:func:`~steering.weights.bake.write_hf`),
  an ablation baked while streaming a checkpoint (:func:`~steering.weights.bake.bake_ablation_stream`),
  provenance read back (:func:`~steering.weights.bake.read_provenance`).
- ``taskvec``: task vectors (a fine-tune − its base), TIES, DARE and Harm Direction Removal.
- ``export``: a baked ablation as a PEFT LoRA adapter (:func:`~steering.weights.export.to_peft`).
"""

from .files import (CODES, DTYPES, INDEX, PICKLED, Checkpoint, SafetensorsFile, ShardWriter, check_output, copy_side_files,
                    model_card, numel, provenance_json, release_memory, strip_remote_code, write_checkpoint)

__all__ = [
    "CODES", "DTYPES", "INDEX", "PICKLED", "Checkpoint", "SafetensorsFile", "ShardWriter", "check_output", "copy_side_files",
    "model_card", "numel", "provenance_json", "release_memory", "strip_remote_code", "write_checkpoint",
]
