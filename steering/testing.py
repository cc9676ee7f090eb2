"""Tiny random models of many families, for tests and benchmarks (no download, no training).

``tiny_model("llama")`` builds a 2–4 layer model from a config with random weights and a small
byte-level BPE tokenizer with a chat template, wrapped as a :class:`steering.Model`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gpt2", "gpt_neox", "opt",
            "olmo2", "phi", "mixtral", "qwen3_moe")


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["How do I bake bread? Write a poem about the sea. Explain photosynthesis to a child.",
              "I'm sorry, but I cannot help with that. Sure, here is how to do it step by step."] * 4
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return tok.to_str()


def tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                  pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(family: str, vocab_size: int = 320, layers: int = 3, d: int = 32) -> Any:
    import transformers as T

    common = dict(vocab_size=vocab_size, hidden_size=d, num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    gqa = dict(intermediate_size=2 * d, num_key_value_heads=2)
    configs = {
        "llama": lambda: T.LlamaConfig(**gqa, **common),
        "mistral": lambda: T.MistralConfig(**gqa, **common),
        "qwen2": lambda: T.Qwen2Config(**gqa, **common),
        "qwen3": lambda: T.Qwen3Config(**gqa, head_dim=d // 4, **common),
        "gemma2": lambda: T.Gemma2Config(**gqa, head_dim=d // 4, **common),
        "gemma3": lambda: T.Gemma3TextConfig(**gqa, head_dim=d // 4, **common),
        "gpt2": lambda: T.GPT2Config(vocab_size=vocab_size, n_embd=d, n_layer=layers, n_head=4, n_positions=256,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0),
        "gpt_neox": lambda: T.GPTNeoXConfig(intermediate_size=2 * d, **common),
        "opt": lambda: T.OPTConfig(vocab_size=vocab_size, hidden_size=d, num_hidden_layers=layers, num_attention_heads=4,
                                   ffn_dim=2 * d, max_position_embeddings=256, word_embed_proj_dim=d,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "olmo2": lambda: T.Olmo2Config(**gqa, **common),
        "phi": lambda: T.PhiConfig(intermediate_size=2 * d, **common),
        "mixtral": lambda: T.MixtralConfig(**gqa, num_local_experts=4, num_experts_per_tok=2, **common),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**gqa, moe_intermediate_size=d, head_dim=d // 4, num_experts=4,
                                              num_experts_per_tok=2, **common),
    }
    if family not in configs:
        raise ValueError(f"tiny_config: unknown family {family!r}; known: {sorted(configs)}")
    return configs[family]()


def tiny_hf_model(family: str, seed: int = 0, **kwargs: Any) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, **kwargs)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random init leaves norms at 1 and some biases at 0; shake them so tests see every term
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_model(family: str, seed: int = 0, **kwargs: Any) -> Any:
    from .model import load

    return load(tiny_hf_model(family, seed, **kwargs), tiny_tokenizer())


def save_sharded(tensors: dict[str, torch.Tensor], folder: Any, n_shards: int = 3, config: dict | None = None) -> Any:
    """Write ``tensors`` as a checkpoint folder of ``n_shards`` safetensors shards with an index
    (written with the ``safetensors`` library, independently of steering's own writer)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    per = -(-len(names) // n_shards)
    weight_map, total = {}, 0
    for i in range(n_shards):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i * per:(i + 1) * per]}
        save_file(part, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "test"}))
    return folder
