"""Hook sites and recording on tiny random models of every family the foundation supports."""

import contextlib
import threading

import pytest
import torch

import steering as st
from steering.hooks import SITES

PROMPTS = ["How do I bake bread?", "Write a poem about the sea, please.", "Hi", "Explain photosynthesis to a child in two sentences."]


def _parallel(m):
    return m.map.parallel or m.map.spec.resid_mid_input is None


def _sites(m):
    return [s for s in SITES if not (s == "resid_mid" and _parallel(m))]


def test_resid_stream_is_consistent_with_hidden_states(family_model):
    m = family_model
    rec = st.record(m, PROMPTS[:1], sites=_sites(m), positions="all", keep="raw", progress=False)
    batch = m.encode(m.format(PROMPTS[:1]))
    with torch.no_grad():
        hs = m.hf(**batch, output_hidden_states=True).hidden_states
    pre, post = rec.raw["resid_pre"][0], rec.raw["resid_post"][0]
    attn, mlp = rec.raw["attn_out"][0], rec.raw["mlp_out"][0]
    for i in range(m.n_layers):
        torch.testing.assert_close(pre[i], hs[i][0], rtol=0, atol=1e-5)
        if i + 1 < m.n_layers:
            torch.testing.assert_close(post[i], pre[i + 1], rtol=0, atol=0)
            torch.testing.assert_close(post[i], hs[i + 1][0], rtol=0, atol=1e-5)
        if _parallel(m):
            torch.testing.assert_close(post[i], pre[i] + attn[i] + mlp[i], rtol=0, atol=1e-5)
        else:
            mid = rec.raw["resid_mid"][0]
            torch.testing.assert_close(mid[i], pre[i] + attn[i], rtol=0, atol=1e-5)
            torch.testing.assert_close(post[i], mid[i] + mlp[i], rtol=0, atol=1e-5)


def _adder(v):
    return lambda x, ctx: x + v.to(x.device, x.dtype)


def test_hooked_generation_same_with_and_without_kv_cache(family_model):
    m = family_model
    torch.manual_seed(1)
    v = torch.randn(m.d_model) * 3
    layer = m.n_layers // 2
    with m.hooks({("resid_pre", layer): _adder(v), ("mlp_out", 0): _adder(v)}):
        cached = m.generate(PROMPTS, max_new_tokens=6, use_cache=True, batch_size=4)
        uncached = m.generate(PROMPTS, max_new_tokens=6, use_cache=False, batch_size=4)
    plain = m.generate(PROMPTS, max_new_tokens=6, batch_size=4)
    assert cached == uncached
    assert cached != plain  # the edit took effect


@pytest.mark.parametrize("positions", ["last:2", "all"])
def test_padding_side_does_not_change_records(family_model, positions):
    m = family_model
    kw = dict(sites=["resid_pre", "attn_out", "resid_post"], positions=positions, keep="raw", progress=False)
    single = [st.record(m, [p], **kw) for p in PROMPTS]
    for side in ("left", "right"):
        batched = st.record(m, PROMPTS, batch_size=4, padding_side=side, **kw)
        for site in kw["sites"]:
            for i, one in enumerate(single):
                torch.testing.assert_close(batched.raw[site][i], one.raw[site][0], rtol=1e-4, atol=1e-5)
            # [layers, positions, d]; 'all' pools every real token of every prompt into one mean
            acts = torch.cat([one.raw[site][0] for one in single], dim=1)
            want = acts.mean(1, keepdim=True) if positions == "all" else acts.view(m.n_layers, len(PROMPTS), 2, -1).mean(1)
            torch.testing.assert_close(batched.mean(site), want, rtol=1e-4, atol=1e-5)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}


def _n_hooks(model):
    return sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in model.modules())


def test_model_bit_identical_after_block_that_raises(family_model):
    m = family_model
    before = _snapshot(m.hf)
    n0 = _n_hooks(m.hf)
    hooks = {(s, l): _adder(torch.ones(m.d_model)) for s in _sites(m) for l in range(m.n_layers)}
    with pytest.raises(RuntimeError, match="boom"):
        with m.hooks(hooks):
            assert _n_hooks(m.hf) > n0
            m.forward(m.format(PROMPTS[:2]))
            raise RuntimeError("boom")
    assert _n_hooks(m.hf) == n0
    after = _snapshot(m.hf)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_failed_setup_removes_what_it_added():
    m = st.testing.tiny_model("llama")
    n0 = _n_hooks(m.hf)
    with pytest.raises(IndexError, match="layer 99"):
        with m.hooks({("resid_pre", 0): _adder(torch.ones(m.d_model)), ("resid_pre", 99): _adder(torch.ones(m.d_model))}):
            pass
    assert _n_hooks(m.hf) == n0
    with pytest.raises(ValueError, match="unknown hook site"):
        with m.hooks({("resid_pre", 0): _adder(torch.ones(m.d_model)), ("resid_nowhere", 0): _adder(torch.ones(m.d_model))}):
            pass
    assert _n_hooks(m.hf) == n0


def test_nested_contexts_remove_only_their_own():
    m = st.testing.tiny_model("llama")
    texts = m.format(PROMPTS[:2])
    base = m.forward(texts)
    v = torch.randn(m.d_model)
    with m.hooks({("resid_pre", 1): _adder(v)}):
        outer = m.forward(texts)
        with m.hooks({("resid_pre", 1): _adder(v)}):
            both = m.forward(texts)
        assert torch.equal(m.forward(texts), outer)
    assert torch.equal(m.forward(texts), base)
    assert not torch.allclose(outer, base) and not torch.allclose(both, outer)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "olmo2", "opt"])
def test_resid_mid_edit_equals_attn_out_edit(family):
    m = st.testing.tiny_model(family)
    texts = m.format(PROMPTS[:2])
    v = torch.randn(m.d_model)
    with m.hooks({("resid_mid", 1): _adder(v)}):
        mid = m.forward(texts)
    with m.hooks({("attn_out", 1): _adder(v)}):
        attn = m.forward(texts)
    torch.testing.assert_close(mid, attn, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mid, m.forward(texts))


def test_parallel_block_has_no_resid_mid():
    m = st.testing.tiny_model("gpt_neox")
    with pytest.raises(st.ArchitectureError, match="no resid_mid"):
        with m.hooks({("resid_mid", 0): _adder(torch.ones(m.d_model))}):
            pass


def test_hooks_see_attention_mask_and_cache_length():
    m = st.testing.tiny_model("llama")
    seen = []

    def spy(x, ctx):
        seen.append((x.shape[1], ctx.past_len, tuple(ctx.attention_mask.shape)))

    with m.hooks({("resid_pre", 0): spy}):
        m.generate(PROMPTS[:2], max_new_tokens=3, batch_size=2)
    prompt_len = seen[0][0]
    assert seen[0][1] == 0 and seen[0][2] == (2, prompt_len)
    assert [s[0] for s in seen[1:]] == [1, 1]
    assert [s[1] for s in seen[1:]] == [prompt_len, prompt_len + 1]


def test_hooks_work_with_accelerate_device_map(tmp_path):
    src = st.testing.tiny_model("llama")
    texts = src.format(PROMPTS[:2])
    v = torch.randn(src.d_model)
    with src.hooks({("resid_pre", 1): _adder(v)}):
        want = src.forward(texts)
    src.hf.save_pretrained(tmp_path / "m")
    src.tokenizer.save_pretrained(tmp_path / "m")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    m = st.load(tmp_path / "m", device_map=device_map, offload_folder=str(tmp_path / "offload"))
    assert m.hf.hf_device_map["model.layers.1"] == "disk"
    with m.hooks({("resid_pre", 1): _adder(v)}):
        got = m.forward(texts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unmapped_architecture_fails_clearly():
    m = st.testing.tiny_hf_model("llama")
    with pytest.raises(st.ArchitectureError, match="nowhere"):
        st.load(m, st.testing.tiny_tokenizer(), arch={"layers": "model.nowhere"})
    with pytest.raises(st.ArchitectureError, match="unknown key"):
        st.load(m, st.testing.tiny_tokenizer(), arch={"layres": "model.layers"})


def test_generic_fallback_maps_an_unknown_family():
    hf = st.testing.tiny_hf_model("llama")
    hf.config.model_type = "my_new_llama"
    m = st.load(hf, st.testing.tiny_tokenizer())
    assert m.map.spec.name.endswith("(generic)")
    assert m.map.spec.layers == "model.layers"
    assert m.map.spec.attn_weights == (("self_attn.o_proj", "out_in"),)
    assert m.map.spec.mlp_weights == (("mlp.down_proj", "out_in"),)
    assert m.map.spec.final_norm == "model.norm" and m.map.spec.unembed == "lm_head"
    with pytest.raises(st.ArchitectureError, match="resid_mid"):
        m.map.sublayer(0, "resid_mid_input")


def test_write_weights_include_fused_experts_and_conv1d():
    moe = st.testing.tiny_model("mixtral")
    (owner, name, layout), = moe.map.write_weights(0, "mlp")
    assert layout == "experts_out_in" and getattr(owner, name).ndim == 3
    gpt2 = st.testing.tiny_model("gpt2")
    (owner, name, layout), = gpt2.map.write_weights(0, "attn")
    assert layout == "in_out" and type(owner).__name__ == "Conv1D"


# --- threads: hooks act only on forward calls of the thread that attached them ----------------------
def _logits(m, batch):
    with torch.inference_mode():
        return m.hf(**batch, use_cache=False).logits


def _masked_adder(v):
    """Adds ``v`` at real tokens only: reads the attach's ForwardState, so a clobbered state shows."""
    return lambda x, ctx: x + ctx.token_mask(x) * v.to(x.device, x.dtype)


def _in_threads(*fns, barriers=()):
    """Run each fn in its own thread; return their results, re-raise the first error (a failing thread
    breaks the barriers so the others stop waiting)."""
    results, errors = [None] * len(fns), []

    def run(i, fn):
        try:
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)
            for b in barriers:
                b.abort()

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


def _refs(m, batch, hook_sets):
    """Single-threaded logits under each list of hooks (applied as nested contexts, in order)."""
    out = []
    for hooks in hook_sets:
        with contextlib.ExitStack() as stack:
            for h in hooks:
                stack.enter_context(m.hooks(h))
            out.append(_logits(m, batch))
    return out


def test_threads_with_different_edits_on_one_model_each_get_their_own():
    m = st.testing.tiny_model("llama")
    batch = m.encode(m.format(PROMPTS[:2]))
    other = m.encode(m.format(PROMPTS))  # the plain thread's batch: other shapes, other mask
    torch.manual_seed(0)
    edits = [{("resid_pre", 1): _masked_adder(torch.randn(m.d_model) * 3), ("mlp_out", 0): _adder(torch.randn(m.d_model))}
             for _ in range(2)]
    want = _refs(m, batch, [[e] for e in edits])
    (plain_want,) = _refs(m, other, [[]])
    n0 = _n_hooks(m.hf)
    attached, done = threading.Barrier(3, timeout=60), threading.Barrier(3, timeout=60)

    def edited(i):
        with m.hooks(edits[i]):
            attached.wait()  # both edits attached at once from here to `done`
            outs = [_logits(m, batch) for _ in range(5)]
            done.wait()
        return outs

    def plain():
        attached.wait()
        outs = [_logits(m, other) for _ in range(5)]
        done.wait()
        return outs

    outs0, outs1, plain_outs = _in_threads(lambda: edited(0), lambda: edited(1), plain, barriers=[attached, done])
    assert not torch.allclose(want[0], want[1])
    for got, ref in [*((o, want[0]) for o in outs0), *((o, want[1]) for o in outs1), *((o, plain_want) for o in plain_outs)]:
        assert torch.equal(got, ref)
    assert _n_hooks(m.hf) == n0
    assert torch.equal(_logits(m, other), plain_want)


def test_thread_can_attach_after_another_threads_block_raised():
    m = st.testing.tiny_model("llama")
    batch = m.encode(m.format(PROMPTS[:2]))
    torch.manual_seed(1)
    vs = [torch.randn(m.d_model) * 3 for _ in range(2)]
    base, *want = _refs(m, batch, [[], [{("resid_pre", 1): _adder(vs[0])}], [{("resid_pre", 1): _adder(vs[1])}]])
    n0 = _n_hooks(m.hf)
    attached, raised = threading.Barrier(2, timeout=60), threading.Event()

    def raiser():
        with pytest.raises(RuntimeError, match="boom"):
            with m.hooks({("resid_pre", 1): _adder(vs[0])}):
                attached.wait()
                out = _logits(m, batch)
                raise RuntimeError("boom")
        raised.set()
        return out

    def steady():
        with m.hooks({("resid_pre", 1): _adder(vs[1])}):
            attached.wait()
            during = _logits(m, batch)
            assert raised.wait(60)
            after = _logits(m, batch)
        return during, after

    out, (during, after) = _in_threads(raiser, steady, barriers=[attached])
    assert torch.equal(out, want[0]) and torch.equal(during, want[1]) and torch.equal(after, want[1])
    assert _n_hooks(m.hf) == n0

    def attach_again():
        with m.hooks({("resid_pre", 1): _adder(vs[0])}):
            return _logits(m, batch)

    (again,) = _in_threads(attach_again)
    assert torch.equal(again, want[0])
    assert torch.equal(_logits(m, batch), base) and _n_hooks(m.hf) == n0


def test_nested_contexts_in_one_thread_while_another_thread_is_edited():
    m = st.testing.tiny_model("llama")
    batch = m.encode(m.format(PROMPTS[:2]))
    torch.manual_seed(2)
    outer, inner, theirs = ({("resid_pre", 1): _adder(torch.randn(m.d_model) * 3)} for _ in range(3))
    base, outer_want, both_want, theirs_want = _refs(m, batch, [[], [outer], [outer, inner], [theirs]])
    n0 = _n_hooks(m.hf)
    attached, done = threading.Barrier(2, timeout=60), threading.Barrier(2, timeout=60)

    def nested():
        attached.wait()
        with m.hooks(outer):
            got = [(_logits(m, batch), outer_want)]
            with m.hooks(inner):
                got.append((_logits(m, batch), both_want))
            got.append((_logits(m, batch), outer_want))
        got.append((_logits(m, batch), base))
        done.wait()
        return got

    def other():
        with m.hooks(theirs):
            attached.wait()
            got = [(_logits(m, batch), theirs_want) for _ in range(4)]
            done.wait()
        return got

    a, b = _in_threads(nested, other, barriers=[attached, done])
    assert len(a) == 4 and len(b) == 4
    for got, ref in a + b:
        assert torch.equal(got, ref)
    assert _n_hooks(m.hf) == n0
