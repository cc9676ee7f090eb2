"""A TransformerLens TransformerBridge goes through the same hooks and recording as plain HF."""

import pytest
import torch

import steering as st

PROMPTS = ["How do I bake bread?", "Hi", "Explain photosynthesis to a child in two sentences."]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tmp_path_factory):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp(request.param)
    plain = st.testing.tiny_model(request.param)
    if request.param == "gpt2":  # scaled up so that its greedy tokens depend on the prompt at all
        with torch.no_grad():
            for p in plain.hf.parameters():
                if p.ndim == 2:
                    p.mul_(10.0)
    plain.hf.save_pretrained(folder)
    plain.tokenizer.save_pretrained(folder)
    hf = st.load(folder, attn_implementation="eager").hf
    bridge = TransformerBridge.boot_transformers(str(folder), hf_model=hf, tokenizer=AutoTokenizer.from_pretrained(folder))
    ref = st.load(folder, attn_implementation="eager")
    return ref, bridge


def test_bridge_records_match_plain_model(pair):
    ref, bridge = pair
    m = st.load(bridge)
    assert m.bridge is bridge and m.n_layers == ref.n_layers
    kw = dict(sites=["resid_pre", "attn_out", "mlp_out", "resid_post"], positions="last:2", progress=False)
    a, b = st.record(ref, PROMPTS, **kw), st.record(m, PROMPTS, **kw)
    for site in kw["sites"]:
        torch.testing.assert_close(b.mean(site), a.mean(site), rtol=1e-4, atol=1e-5)


def test_bridge_hooks_fire_through_bridge_forward_and_generate(pair):
    ref, bridge = pair
    m = st.load(bridge)
    v = torch.randn(m.d_model) * 3
    add = {("resid_pre", 1): lambda x, ctx: x + v}
    ids = m.encode(m.format(PROMPTS[:1]))["input_ids"]
    with torch.no_grad():
        plain = bridge(ids)
        with m.hooks(add):
            steered = bridge(ids)  # the bridge's own forward
        with ref.hooks(add):
            want = ref.hf(input_ids=ids).logits
    torch.testing.assert_close(steered, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(steered, plain)
    small = {("resid_pre", 1): lambda x, ctx: x + 0.3 * v}  # changes the tokens without collapsing them
    with m.hooks(small), ref.hooks(small):
        assert m.generate(PROMPTS, max_new_tokens=8) == ref.generate(PROMPTS, max_new_tokens=8)


def test_bridge_generates_the_plain_models_tokens(pair):
    """Unedited greedy decoding through the bridge equals the plain HF model's, token for token,
    whatever the installed transformers / TransformerLens do with the KV cache."""
    ref, bridge = pair
    m = st.load(bridge)
    enc = ref.encode(ref.format(PROMPTS), padding_side="left")
    kw = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=ref.tokenizer.pad_token_id)
    with torch.no_grad():
        want = ref.hf.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
    assert len(set(want[:, -8:].flatten().tolist())) > 3  # real text, not one repeated token
    texts = m.generate(PROMPTS, max_new_tokens=8)
    assert texts == ref.tokenizer.batch_decode(want[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert texts == ref.generate(PROMPTS, max_new_tokens=8)
    if not m.kv_cache_ok:  # decoding falls back to no cache; asking for the cache is one clear error
        with pytest.raises(ValueError, match="use_cache=True refused"):
            m.generate(PROMPTS[:1], max_new_tokens=2, use_cache=True)


def test_kv_cache_check_finds_a_cache_that_is_not_read():
    """kv_cache_works is true of a plain model and false once the attention stops reading the cache."""
    from steering.kvcache import CACHE_NAMES, kv_cache_works

    m = st.testing.tiny_model("llama")
    assert kv_cache_works(m.hf)

    def drop_cache(module, args, kwargs):
        return args, {k: v for k, v in kwargs.items() if k not in CACHE_NAMES}

    handles = [layer.self_attn.register_forward_pre_hook(drop_cache, with_kwargs=True) for layer in m.hf.model.layers]
    try:
        assert not kv_cache_works(m.hf)
    finally:
        for h in handles:
            h.remove()
    assert kv_cache_works(m.hf)
