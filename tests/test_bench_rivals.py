"""experiments/_bench_rivals.py makes steering's edits through TransformerLens's bridge and nnsight:
same tokens as steering's hooked generation, KV cache on, left-padded batches; and the bridge's
run_with_cache means equal steering's recording."""

import contextlib
import copy
import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("nnsight")
pytest.importorskip("transformer_lens")

import steering as st
from steering.edits import Ablation, Addition
from steering.hooks import attach
from steering.vectors import SteeringVector

PROMPTS = ["How do I bake bread?", "Hi", "Explain photosynthesis to a child in two sentences."]
N_NEW = 6


def _load_rivals():
    path = Path(__file__).resolve().parents[1] / "experiments" / "_bench_rivals.py"
    spec = importlib.util.spec_from_file_location("_bench_rivals", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rivals = _load_rivals()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tools(one_thread, tmp_path_factory, request):
    """Steering's reference model and one copy each wrapped by the bridge and by nnsight (eager attention
    everywhere, as the bridge forces it, so the three run the same kernels).

    Llama has rotary positions, blind to a constant shift of a row's positions; GPT-2's learned
    absolute positions are not, so it checks that left padding gets its positions right. Its random
    matrices are scaled up (x10) so that its greedy tokens depend on the prompt at all."""
    folder = tmp_path_factory.mktemp(request.param)
    plain = st.testing.tiny_model(request.param)
    if request.param == "gpt2":
        with torch.no_grad():
            for p in plain.hf.parameters():
                if p.ndim == 2:
                    p.mul_(10.0)
    plain.hf.save_pretrained(folder)
    plain.tokenizer.save_pretrained(folder)
    ref = st.load(folder, attn_implementation="eager")
    bridge = rivals.bridge_of(copy.deepcopy(ref.hf), ref.tokenizer, folder)
    lm = rivals.nnsight_of(copy.deepcopy(ref.hf), ref.tokenizer)
    return ref, bridge, lm


@pytest.fixture(scope="module")
def batch(tools):
    ref = tools[0]
    enc = ref.encode(ref.format(PROMPTS[:2]), padding_side="left")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert mask[1, 0] == 0 and mask[:, -1].all()  # two lengths, left padded
    return ids, mask


@pytest.fixture(scope="module")
def edits(tools, batch):
    ref = tools[0]
    ids, mask = batch
    with torch.no_grad():
        hs = ref.hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    stream = torch.stack([h[mask.bool()].norm(dim=-1).mean() for h in hs[:ref.n_layers]])  # [n_layers]
    g = torch.Generator().manual_seed(1)
    # Half the stream's typical norm: enough to change the tokens, not so much that they collapse
    # into one repeated token.
    u = torch.randn(ref.n_layers, ref.d_model, generator=g)
    V = 0.5 * stream[:, None] * u / u.norm(dim=-1, keepdim=True)
    r = torch.randn(ref.d_model, generator=g)
    return {None: None, "add": ("add", V), "ablate": ("ablate", r / r.norm())}


def steering_edit(ref, edit):
    if edit is None:
        return contextlib.nullcontext()
    kind, value = edit
    if kind == "add":
        return Addition(SteeringVector({l: value[l] for l in range(ref.n_layers)}, "resid_pre")).hooks(ref)
    return Ablation(value).hooks(ref)


def reference(ref, ids, mask, n=N_NEW):
    """Steering's own generation: HF generate, greedy, KV cache, EOS an ordinary token."""
    with torch.no_grad():
        out = ref.hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                              eos_token_id=None, pad_token_id=ref.tokenizer.pad_token_id, use_cache=True)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("kind", [None, "add", "ablate"])
def test_rivals_generate_the_same_tokens_as_steering(tools, batch, edits, kind):
    ref, bridge, lm = tools
    ids, mask = batch
    edit = edits[kind]
    with steering_edit(ref, edit):
        want = reference(ref, ids, mask)
    assert want.shape == (2, N_NEW)
    got_bridge = rivals.bridge_generate(bridge, ids, mask, N_NEW, edit)
    got_nnsight = rivals.nnsight_generate(lm, ids, mask, N_NEW, edit)
    assert got_bridge.tolist() == want.tolist()
    assert got_nnsight.tolist() == want.tolist()
    if kind is None:
        return
    # The comparison can fail: the edit changes the tokens, and so would a rival that skipped the
    # decoding steps (add) or the attention/MLP sites (ablate).
    plain = reference(ref, ids, mask)
    assert want.tolist() != plain.tolist()
    if kind == "add":
        V = edit[1]
        partial = [(("resid_pre", l), lambda x, ctx, v=V[l]: x + v if ctx.past_len == 0 else None)
                   for l in range(ref.n_layers)]
    else:
        r = edit[1]
        partial = [(("resid_pre", l), lambda x, ctx: x - (x @ r)[..., None] * r) for l in range(ref.n_layers)]
    with attach(ref, partial):
        assert reference(ref, ids, mask).tolist() != want.tolist()


def test_left_padded_rows_generate_as_they_would_alone(tools, batch):
    ref, bridge, lm = tools
    ids, mask = batch
    want = []
    for text in ref.format(PROMPTS[:2]):
        alone = ref.encode([text])
        want += reference(ref, alone["input_ids"], alone["attention_mask"]).tolist()
    assert reference(ref, ids, mask).tolist() == want
    assert rivals.bridge_generate(bridge, ids, mask, N_NEW).tolist() == want
    assert rivals.nnsight_generate(lm, ids, mask, N_NEW).tolist() == want
    if ref.hf.config.model_type == "gpt2":  # positions counted from the padding would change the short row
        with torch.no_grad():
            wrong = ref.hf.generate(input_ids=ids, attention_mask=mask, position_ids=torch.arange(ids.shape[1]).expand_as(ids),
                                    max_new_tokens=N_NEW, do_sample=False, eos_token_id=None,
                                    pad_token_id=ref.tokenizer.pad_token_id)[:, ids.shape[1]:]
        assert wrong.tolist() != want


def test_rivals_use_the_kv_cache(tools, batch, edits):
    """One forward over the prompt, then one token per step: the embedding sees [2, T] then [2, 1]
    (where the bridge's cache works; else [2, T + i] at step i)."""
    _, bridge, lm = tools
    ids, mask = batch
    want = [tuple(ids.shape)] + [(2, 1)] * (N_NEW - 1)
    # A bridge whose cache is broken (TransformerLens 4.3 under transformers 5.24) decodes without it.
    uncached = [(2, ids.shape[1] + i) for i in range(N_NEW)]
    bridge_want = want if rivals.bridge_cache_works(bridge) else uncached
    for embed, run, want in [
            (bridge.original_model.get_input_embeddings(), lambda: rivals.bridge_generate(bridge, ids, mask, N_NEW, edits["add"]), bridge_want),
            (lm.pipeline.model.get_input_embeddings(), lambda: rivals.nnsight_generate(lm, ids, mask, N_NEW, edits["add"]), want)]:
        seen = []
        handle = embed.register_forward_hook(lambda mod, args, out, seen=seen: seen.append(tuple(out.shape[:2])))
        try:
            run()
        finally:
            handle.remove()
        assert seen == want


def test_bridge_record_means_match_steering_record(tools):
    ref, bridge, _ = tools
    texts = ref.format(PROMPTS)
    batches = [ref.encode(texts[i:i + 2], padding_side="left") for i in range(0, len(texts), 2)]
    got = rivals.bridge_record_means(bridge, batches)
    rec = st.record(ref, PROMPTS, sites="resid_pre", positions="last", batch_size=2, progress=False)
    assert got.dtype == torch.float64 and got.shape == (ref.n_layers, ref.d_model)
    torch.testing.assert_close(got.float(), rec.mean("resid_pre")[:, 0], rtol=0, atol=1e-4)
    # and against a plain HF forward: hidden_states[l] is the stream entering layer l
    with torch.no_grad():
        plain = torch.zeros_like(got)
        for b in batches:
            hs = ref.hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                        position_ids=b.get("position_ids"), output_hidden_states=True).hidden_states
            plain += torch.stack([h[:, -1] for h in hs[:ref.n_layers]]).double().sum(1)
    torch.testing.assert_close(got, plain / len(PROMPTS), rtol=0, atol=1e-4)
