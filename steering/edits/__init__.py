"""Training-free edits as small immutable values.

Every edit has ``edit.hooks(model)``, a context manager that runs the model with the edit applied
(and removes it, bit-identically, on exit), and ``edit.save(path)`` / :func:`load_edit`. Where
the edit is exactly a weight change, ``edit.bake(model)`` returns a baked copy (or bakes in place
with ``inplace=True``) that gives the same outputs as the hooks.

One file per kind of edit:

- ``ablation``: :class:`Ablation`, remove a direction or a low-rank subspace from the residual
  stream at every layer's input, attention output and MLP output, at all positions (Arditi et
  al.). Bakes into weights by orthogonalisation (embeddings, every stream-writing matrix, fused
  MoE experts, GPT-2 Conv1D, stream-writing biases); refuses on post-norm families, where no
  weight edit is exact. :class:`AffineAblation`, the same, but coordinates along the basis are
  set to harmless prompts' mean (affine concept editing) instead of zero; bakes exactly as the
  orthogonalisation plus biases along the basis (no PEFT form).
- ``addition``: :class:`Addition`, ActAdd / CAA, ``h_l ← h_l + c·r`` at chosen layers, at all
  positions or only from the post-instruction tokens on; bakes as a bias (all positions only).
  :class:`ICVInjection`, Safety Arithmetic's in-context safety vector, norm-preserving, at the
  site it was read from by default.
- ``conditional``: :class:`Conditional`, another edit applied only to the sequences whose
  projection on a condition direction passes a threshold (chosen on validation prompts by
  :meth:`Conditional.fit`), per sequence in a batch.
- ``base``: the :class:`Edit` base class, :class:`Compose` (several edits at once),
  :func:`combine`, and the registry :func:`load_edit` reads through (subclass :class:`Edit` with
  a ``kind`` and ``from_parts`` to add a kind).
"""

from .ablation import ABLATION_SITES, Ablation, AffineAblation, project_out, project_rows
from .addition import ADDITION_POSITIONS, Addition, ICVInjection
from .base import FORMAT, KINDS, Compose, Edit, add_bias, combine, load_edit, orthonormal, untie_embeddings
from .conditional import Conditional

__all__ = [
    "ABLATION_SITES", "ADDITION_POSITIONS", "FORMAT", "KINDS", "Ablation", "AffineAblation", "Addition", "Compose",
    "Conditional", "Edit", "ICVInjection", "add_bias", "combine", "load_edit", "orthonormal", "project_out",
    "project_rows", "untie_embeddings",
]
