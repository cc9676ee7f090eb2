"""Load any causal LM once, the same way whatever it is.

``steering.load`` takes a local Hugging Face folder or a hub name (the same ``from_pretrained``
path: users with a hub just name the model), an already-loaded ``PreTrainedModel`` with its
tokenizer, or a TransformerLens ``TransformerBridge``. Weights load from safetensors only, and
``trust_remote_code`` stays off unless the caller turns it on.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from .arch import ArchSpec, ModelMap, resolve_spec
from .hooks import attach

_MARK = "\u2063STEERINGMARK\u2063"


# Names like ``organism:drifted`` that stand for a local folder: scheme -> fn(name) -> folder. The
# layers above the core register theirs (steering/__init__.py registers ``organism``), so loading
# never imports the application layer.
NAME_SCHEMES: dict[str, Callable[[str], str]] = {}


def register_scheme(scheme: str, resolve: Callable[[str], str]) -> None:
    """Let ``steering.load("SCHEME:...")`` load the folder ``resolve("SCHEME:...")`` returns."""
    NAME_SCHEMES[scheme] = resolve


def resolve_name(name: str) -> str:
    """The folder a registered name stands for (``organism:KIND`` → its folder); other names unchanged."""
    scheme, sep, _ = str(name).partition(":")
    return NAME_SCHEMES[scheme](str(name)) if sep and scheme in NAME_SCHEMES else str(name)


def _is_bridge(obj: Any) -> bool:
    return type(obj).__module__.startswith("transformer_lens") and hasattr(obj, "original_model")


@dataclass(eq=False)
class Model:
    """A loaded causal LM with its tokenizer and its architecture map.

    ``hf`` is the Hugging Face module that runs (for a bridge, the bridge's ``original_model``,
    whose forward goes through the bridge's components). ``source`` is what it was loaded from.
    """

    hf: nn.Module
    tokenizer: Any = None
    arch: dict[str, Any] | ArchSpec | None = None
    source: str = ""
    bridge: Any = None
    map: ModelMap = field(init=False)

    def __post_init__(self) -> None:
        self.map = ModelMap(self.hf, resolve_spec(self.hf, self.arch))
        if self.tokenizer is not None and self.tokenizer.pad_token is None:
            # Padding is masked everywhere, so any token will do; eos is the common choice.
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token

    # --- shape -----------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.map.n_layers

    @property
    def d_model(self) -> int:
        return self.map.d_model

    @property
    def device(self) -> torch.device:
        return self.map.module("embed").weight.device if self.map.spec.embed else next(self.hf.parameters()).device

    @property
    def name(self) -> str:
        return self.source or str(getattr(self.hf.config, "_name_or_path", "")) or type(self.hf).__name__

    @cached_property
    def kv_cache_ok(self) -> bool:
        """Whether decoding under the KV cache gives the model's own tokens. Plain Hugging Face
        models are trusted; a TransformerLens bridge is checked once (:func:`steering.kvcache.kv_cache_works`),
        since a bridge that reads the cache under an older argument name decodes garbage."""
        if self.bridge is None:
            return True
        from .kvcache import kv_cache_works

        return kv_cache_works(self.hf)

    def hooks(self, hooks: Any):
        """Context manager running this model with ``hooks`` attached (see :func:`steering.hooks.attach`)."""
        return attach(self, hooks)

    # --- text ------------------------------------------------------------------------------
    def require_tokenizer(self) -> Any:
        """The tokenizer, or a one-line error saying how to give one."""
        if self.tokenizer is None:
            raise ValueError(f"{self.name}: no tokenizer; pass one to steering.load(model, tokenizer)")
        return self.tokenizer

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def format(self, prompts: Iterable[str], chat: bool | None = None, system: str | None = None) -> list[str]:
        """Prompts as the model sees them: through the tokenizer's chat template when it has one
        (``chat=None``), always (``True``, an error without a template) or never (``False``)."""
        prompts = list(prompts)
        use = self.has_chat_template if chat is None else chat
        if not use:
            return prompts
        tok = self.require_tokenizer()
        if not self.has_chat_template:
            raise ValueError(f"{self.name}: chat=True but the tokenizer has no chat_template")
        out = []
        for p in prompts:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
            out.append(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        return out

    @cached_property
    def post_instruction_len(self) -> int:
        """How many tokens the chat template puts after the user's message (at least 1)."""
        if not self.has_chat_template:
            return 1
        text = self.format([_MARK], chat=True)[0]
        suffix = text.split(_MARK)[-1]
        return max(1, len(self.require_tokenizer()(suffix, add_special_tokens=False)["input_ids"]))

    @property
    def max_length(self) -> int:
        """The longest input the model takes (its position limit, or the tokenizer's)."""
        cfg = self.hf.config
        limits = [getattr(cfg, k) for k in ("max_position_embeddings", "n_positions") if isinstance(getattr(cfg, k, None), int)]
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and tok_max < 10**9:
            limits.append(tok_max)
        return min(limits) if limits else 10**9

    @cached_property
    def _forward_args(self) -> set[str]:
        return set(inspect.signature(self.hf.forward).parameters)

    def encode(self, texts: Sequence[str], padding_side: str = "left", room: int = 0) -> dict[str, Tensor]:
        """Tokenise already-formatted texts as one padded batch, with position ids that skip padding.

        Texts longer than the model takes (less ``room`` for tokens still to be generated) are cut
        from the left."""
        tok = self.require_tokenizer()
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        old = tok.padding_side, tok.truncation_side
        tok.padding_side, tok.truncation_side = padding_side, "left"
        try:
            # Chat templates already put the BOS token in; don't add a second one. Over-long
            # prompts lose their beginning, never the template's end the model answers after.
            batch = tok(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=self.max_length - room,
                        add_special_tokens=not self.has_chat_template)
        finally:
            tok.padding_side, tok.truncation_side = old
        out = {"input_ids": batch["input_ids"].to(self.device), "attention_mask": batch["attention_mask"].to(self.device)}
        if "position_ids" in self._forward_args:
            out["position_ids"] = (out["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        return out

    @torch.inference_mode()
    def forward(self, texts: Sequence[str], padding_side: str = "left") -> Tensor:
        """Logits ``[batch, seq, vocab]`` for already-formatted texts."""
        return self.hf(**self.encode(texts, padding_side), use_cache=False).logits

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 48, batch_size: int = 16,
                 chat: bool | None = None, progress: bool = False, **gen_kwargs: Any) -> list[str]:
        """Greedy (unless told otherwise) completions of ``prompts``, decoded without the prompt.

        Decodes under the KV cache where it gives the model's own tokens (:attr:`kv_cache_ok`), and
        without it where it does not (a TransformerLens bridge whose attention ignores the cache
        argument the installed transformers passes); asking for the cache there is an error."""
        from tqdm.auto import tqdm

        texts = self.format(prompts, chat=chat)
        tok = self.require_tokenizer()
        gen_kwargs.setdefault("do_sample", False)
        if not self.kv_cache_ok:
            if gen_kwargs.get("use_cache"):
                raise ValueError(f"{self.name}: use_cache=True refused: this bridge's KV cache gives wrong tokens "
                                 "with the installed transformers / transformer-lens; leave use_cache unset")
            gen_kwargs["use_cache"] = False
        out: list[str] = []
        for start in tqdm(range(0, len(texts), batch_size), disable=not progress, desc="generate"):
            batch = self.encode(texts[start:start + batch_size], padding_side="left", room=max_new_tokens)
            batch.pop("position_ids", None)  # generate derives them from the mask
            ids = self.hf.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **gen_kwargs)
            out.extend(tok.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True))
        return out


def _check_local(path: Path) -> None:
    """A local model folder, checked before ``from_pretrained`` reads it: its config, and every
    safetensors header read by the same reader the weight edits use (a truncated, empty or corrupt
    file is one error naming it)."""
    from .weights.files import Checkpoint

    if not path.exists():
        raise FileNotFoundError(f"{path}: no such folder")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a folder (a local model must be a Hugging Face folder)")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json; not a Hugging Face model folder")
    if not any(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").exists():
        raise FileNotFoundError(f"{path}: no .safetensors weights (steering loads weights only from safetensors)")
    Checkpoint(path)


def _looks_like_path(name: str) -> bool:
    """A name that can only be a local path: hub names are ``name`` or ``owner/name``."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/") or os.sep != "/" and os.sep in name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load(model: Any, tokenizer: Any = None, *, arch: dict[str, Any] | ArchSpec | None = None,
         dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
         device_map: Any = None, trust_remote_code: bool = False, revision: str | None = None,
         **from_pretrained_kwargs: Any) -> Model:
    """Load or wrap a causal LM.

    - ``load("path/to/folder")`` or ``load("meta-llama/Llama-3.1-8B-Instruct")``: ``from_pretrained``
      for model and tokenizer (safetensors only; ``device_map="auto"`` places a big model with accelerate);
    - ``load(hf_model, tokenizer)``: a model you already have;
    - ``load(bridge)``: a TransformerLens ``TransformerBridge`` (its tokenizer is used);
    - ``load("organism:drifted")`` or ``load("organism:gpt2/aligned")``: a model organism
      (:mod:`steering.organisms`), built and cached on first use.

    ``arch`` overrides or completes the architecture map (see ``steering/architectures.json``).
    Other keyword arguments (``offload_folder``, ``attn_implementation``, ...) go to ``from_pretrained``.
    """
    if from_pretrained_kwargs.get("use_safetensors") is False:
        raise ValueError("load: use_safetensors=False is refused; steering loads weights only from safetensors")
    if isinstance(model, Model):
        if arch is not None or tokenizer is not None:
            again = Model(model.hf, tokenizer or model.tokenizer, arch or model.arch, model.source, model.bridge)
            if "kv_cache_ok" in model.__dict__:
                again.kv_cache_ok = model.kv_cache_ok
            return again
        return model
    if _is_bridge(model):
        hf = model.original_model
        wrapped = Model(hf, tokenizer or getattr(model, "tokenizer", None), arch,
                        str(getattr(hf.config, "_name_or_path", "")), bridge=model)
        wrapped.kv_cache_ok  # checked now, before any edit is attached to the model
        return wrapped
    if isinstance(model, nn.Module):
        if not hasattr(model, "config"):
            raise TypeError(f"load: {type(model).__name__} is not a Hugging Face model (no .config)")
        return Model(model, tokenizer, arch, str(getattr(model.config, "_name_or_path", "")))
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"load: expected a path, hub name, PreTrainedModel or TransformerBridge, got {type(model).__name__}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = resolve_name(os.fspath(model))  # e.g. organism:KIND or organism:ARCH/KIND (built on first use)
    local = Path(name).expanduser()
    is_local = local.exists() or _looks_like_path(name)
    if is_local:
        _check_local(local)
        name = str(local)
    kwargs: dict[str, Any] = {**from_pretrained_kwargs, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    # Mismatched shapes are let through by transformers only to be named here, one line, then refused
    # (unless the caller asked to ignore them).
    refuse_mismatched = not kwargs.get("ignore_mismatched_sizes", False)
    kwargs["ignore_mismatched_sizes"] = True
    try:
        hf, info = AutoModelForCausalLM.from_pretrained(name, output_loading_info=True, **kwargs)
    except OSError as exc:
        if is_local:
            raise OSError(f"{name}: cannot load the model ({_first_line(exc)})") from None
        raise OSError(f"{name}: no such local folder, and it could not be loaded as a hub name "
                      f"({_first_line(exc)})") from None
    except (RuntimeError, ValueError) as exc:  # e.g. weights whose shapes are not the config's
        raise ValueError(f"{name}: cannot load the model ({_first_line(exc)})") from None
    for key, what in (("missing_keys", "is missing from the checkpoint (it would be random)"),
                      ("mismatched_keys", "has a shape that differs from the config's")):
        if key == "mismatched_keys" and not refuse_mismatched:
            continue
        bad = sorted(str(k if isinstance(k, str) else k[0]) for k in (info.get(key) or []))
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise ValueError(f"{name}: tensor {bad[0]!r} {what}{more}")
    if device is not None and device_map is None:
        hf = hf.to(device)
    hf.eval()
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code,
                                                  **({"revision": revision} if revision else {}))
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer), trust_remote_code=trust_remote_code)
    return Model(hf, tokenizer, arch, name)


def as_model(obj: Any) -> Model:
    return obj if isinstance(obj, Model) else load(obj)
