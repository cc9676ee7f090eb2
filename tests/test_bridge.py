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
    with m.hooks(add), ref.hooks(add):
        assert m.generate(PROMPTS, max_new_tokens=5) == ref.generate(PROMPTS, max_new_tokens=5)
