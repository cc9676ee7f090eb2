"""Record activations over many prompts, reducing on the fly.

``record(model, prompts, sites=..., layers=..., positions=...)`` runs the prompts in batches and
keeps, per site, a running sum of the chosen positions' activations per (layer, position) in
float64, so memory does not grow with the number of prompts. ``keep="raw"`` also keeps each
prompt's activations (on the CPU) for PCA and the like.

Positions:
- ``"last"`` or ``"last:k"`` (or an int k): the last k tokens of each prompt, aligned from the end;
- ``"post_instruction"``: the tokens the chat template puts after the user's message (the
  refusal-direction recipe's positions), i.e. ``last:model.post_instruction_len``;
- ``"all"``: every real token, pooled into one mean per layer (padding never counts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from .hooks import SITES, HookContext, attach, last_real_index
from .model import Model, as_model


def parse_positions(positions: str | int, model: Model) -> int | None:
    """Number of trailing tokens to keep, or None for every real token."""
    if isinstance(positions, int) and not isinstance(positions, bool):
        k = positions
    elif positions == "all":
        return None
    elif positions == "post_instruction":
        k = model.post_instruction_len
    elif positions == "last":
        k = 1
    elif isinstance(positions, str) and positions.startswith("last:") and positions[5:].isdigit():
        k = int(positions[5:])
    else:
        raise ValueError(f"positions={positions!r}: use 'last', 'last:K', an int K, 'post_instruction' or 'all'")
    if k < 1:
        raise ValueError(f"positions={positions!r}: need at least one position")
    return k


@dataclass
class Recording:
    """Running means (and optionally raw activations) per site.

    ``mean(site)`` is ``[n_layers, n_positions, d_model]`` (``n_positions`` is k for 'last:k',
    1 for 'all'); ``layers`` lists which model layers its first axis stands for.
    """

    layers: list[int]
    positions: str | int
    n_positions: int
    sums: dict[str, Tensor] = field(default_factory=dict)  # float64 running sums
    counts: dict[str, Tensor] = field(default_factory=dict)  # [n_positions] tokens summed
    raw: dict[str, list[Tensor]] = field(default_factory=dict)
    n_prompts: int = 0

    def mean(self, site: str = "resid_pre") -> Tensor:
        if site not in self.sums:
            raise KeyError(f"site {site!r} was not recorded; recorded: {sorted(self.sums)}")
        return (self.sums[site] / self.counts[site].clamp(min=1)[None, :, None]).float()

    def state_nbytes(self) -> int:
        """Bytes held by the running reduction (not the raw activations)."""
        return sum(t.numel() * t.element_size() for t in [*self.sums.values(), *self.counts.values()])


def _index(mask: Tensor, k: int) -> Tensor:
    """[batch, k] indices of each row's last k real tokens (works for left and right padding)."""
    lengths = mask.sum(-1)
    if int(lengths.min()) < k:
        raise ValueError(f"a prompt has {int(lengths.min())} tokens, fewer than the {k} positions asked for")
    last = last_real_index(mask, mask.shape[0], mask.shape[1])
    return last[:, None] - torch.arange(k - 1, -1, -1, device=mask.device)[None, :]


def record(model: Any, prompts: Iterable[str], *, sites: str | Sequence[str] = "resid_pre",
           layers: Iterable[int] | None = None, positions: str | int = "last", batch_size: int = 16,
           chat: bool | None = None, keep: str = "mean", padding_side: str = "left",
           progress: bool = True) -> Recording:
    """Run ``prompts`` through ``model`` and reduce the activations at ``sites`` and ``layers``.

    ``prompts`` are raw user messages (formatted with the chat template when the tokenizer has one,
    see ``chat``) or a prompt-set name understood by :func:`steering.datasets.load`.
    """
    from tqdm.auto import tqdm

    sm = as_model(model)
    if isinstance(prompts, str):
        from . import datasets
        prompts = datasets.load(prompts)
    prompts = list(prompts)
    if not prompts:
        raise ValueError("record: no prompts")
    sites = [sites] if isinstance(sites, str) else list(sites)
    for s in sites:
        if s not in SITES:
            raise ValueError(f"record: unknown site {s!r}; sites are {SITES}")
    if keep not in ("mean", "raw"):
        raise ValueError(f"record: keep={keep!r}; use 'mean' or 'raw'")
    layer_list = list(range(sm.n_layers)) if layers is None else [int(l) + sm.n_layers if int(l) < 0 else int(l) for l in layers]
    for given, layer in zip(layers or [], layer_list):
        if not 0 <= layer < sm.n_layers:
            raise IndexError(f"record: layer {given} is out of range: the model has {sm.n_layers} layers "
                             f"(0..{sm.n_layers - 1}, or -1..-{sm.n_layers} from the end)")
    if batch_size < 1:
        raise ValueError(f"record: batch_size must be at least 1, not {batch_size}")
    k = parse_positions(positions, sm)
    n_pos = 1 if k is None else k
    rec = Recording(layer_list, positions, n_pos)
    d = sm.d_model
    for s in sites:
        rec.sums[s] = torch.zeros(len(layer_list), n_pos, d, dtype=torch.float64)
        rec.counts[s] = torch.zeros(n_pos, dtype=torch.float64)
        if keep == "raw":
            rec.raw[s] = []

    batch_state: dict[str, Any] = {}
    slot = {layer: i for i, layer in enumerate(layer_list)}

    def make_hook(site: str):
        def hook(x: Tensor, ctx: HookContext) -> None:
            mask = batch_state["mask"].to(x.device)
            if k is None:
                m = mask.to(x.dtype).unsqueeze(-1)
                picked = (x * m).sum(1, keepdim=True).double()  # [batch, 1, d]
                if keep == "raw":
                    batch_state["raw"][site][slot[ctx.layer]] = [x[b, mask[b].bool()].detach().float().cpu() for b in range(x.shape[0])]
            else:
                idx = batch_state["index"].to(x.device)
                picked = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1])).double()
                if keep == "raw":
                    batch_state["raw"][site][slot[ctx.layer]] = picked.float().cpu()
            rec.sums[site][slot[ctx.layer]] += picked.sum(0).cpu()
            return None
        return hook

    hooks = [((s, layer), make_hook(s)) for s in sites for layer in layer_list]
    texts = sm.format(prompts, chat=chat)
    with attach(sm, hooks), torch.inference_mode():
        for start in tqdm(range(0, len(texts), batch_size), disable=not progress, desc="record", unit="batch"):
            batch = sm.encode(texts[start:start + batch_size], padding_side=padding_side)
            mask = batch["attention_mask"]
            batch_state["mask"] = mask
            if k is not None:
                batch_state["index"] = _index(mask, k)
            batch_state["raw"] = {s: [None] * len(layer_list) for s in sites}
            sm.hf(**batch, use_cache=False)
            for s in sites:
                rec.counts[s] += mask.sum().double().cpu() if k is None else float(mask.shape[0])
                if keep == "raw":
                    per_layer = batch_state["raw"][s]
                    for b in range(mask.shape[0]):
                        rec.raw[s].append(torch.stack([pl[b] for pl in per_layer]))  # [layers, positions, d]
            rec.n_prompts += mask.shape[0]
    return rec


def save_recording(rec: Recording, path: str, model_name: str = "") -> None:
    """Write the running means (float32) as safetensors, with what they are in the metadata."""
    import json

    from safetensors.torch import save_file

    from .io import atomic_write

    tensors = {f"{site}.mean": rec.mean(site).contiguous() for site in rec.sums}
    meta = {"format": "steering.recording", "layers": json.dumps(rec.layers), "positions": str(rec.positions),
            "n_prompts": str(rec.n_prompts), "model": model_name}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
