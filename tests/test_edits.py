"""Edits on tiny random models: hooks against baked weights, per-sequence conditions, files."""

import pytest
import torch

import steering as st
from steering.edits import Ablation, AffineAblation, Addition, Compose, Conditional, ICVInjection, load_edit
from steering.testing import FAMILIES
from steering.vectors import SteeringVector

PROMPTS = ["How do I bake bread?", "Write a poem about the sea, please.", "Hi", "Explain photosynthesis to a child."]
POST_NORM = {"gemma2", "gemma3", "olmo2"}


def _logits(m, texts):
    return m.forward(texts)


@pytest.mark.parametrize("family", FAMILIES)
def test_baked_orthogonalisation_equals_ablation_hooks(family):
    m = st.testing.tiny_model(family)
    texts = m.format(PROMPTS)
    torch.manual_seed(0)
    edit = Ablation(torch.randn(m.d_model))
    plain = _logits(m, texts)
    with edit.hooks(m):
        hooked = _logits(m, texts)
    assert (hooked - plain).abs().max() > 1e-3  # the edit does something
    if family in POST_NORM:
        with pytest.raises(st.ArchitectureError, match="normalised"):
            edit.bake(m)
        return
    baked = edit.bake(m)
    assert baked.hf is not m.hf
    torch.testing.assert_close(_logits(baked, texts), hooked, rtol=0, atol=1e-4)
    torch.testing.assert_close(_logits(m, texts), plain, rtol=0, atol=0)  # the source model is untouched


@pytest.mark.parametrize("family", FAMILIES)
def test_baked_affine_ablation_equals_its_hooks(family, tmp_path):
    from steering.weights.bake import write_hf

    m = st.testing.tiny_model(family)
    texts = m.format(PROMPTS)
    torch.manual_seed(0)
    edit = AffineAblation.fit(m, torch.randn(2, m.d_model), PROMPTS)
    plain = _logits(m, texts)
    with edit.hooks(m):
        hooked = _logits(m, texts)
    with Ablation(edit.basis).hooks(m):
        assert (hooked - _logits(m, texts)).abs().max() > 1e-3  # the offsets matter
    if family in POST_NORM:
        with pytest.raises(st.ArchitectureError, match="normalised"):
            edit.bake(m)
        return
    if family in ("mixtral", "qwen3_moe"):
        with pytest.raises(st.ArchitectureError, match="fused experts"):
            edit.bake(m)
        return
    baked = edit.bake(m)
    torch.testing.assert_close(_logits(baked, texts), hooked, rtol=0, atol=1e-4)
    torch.testing.assert_close(_logits(m, texts), plain, rtol=0, atol=0)  # the source model is untouched
    # written and loaded back: the biases survive, declared in the config where the family has flags
    if family in ("mistral", "qwen2", "qwen3"):  # no config flag declares an MLP output bias
        with pytest.raises(ValueError, match="down_proj.bias.*no flag that declares it"):
            write_hf(baked, tmp_path / "out", {"method": "affine bake"})
        assert not (tmp_path / "out").exists() and not getattr(baked.hf.config, "attention_bias", False)  # nothing half-done
        return
    write_hf(baked, tmp_path / "out", {"method": "affine bake"})
    again = st.load(tmp_path / "out")
    torch.testing.assert_close(_logits(again, texts), hooked, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
def test_subspace_ablation_bakes_too(family):
    m = st.testing.tiny_model(family)
    texts = m.format(PROMPTS)
    edit = Ablation(torch.randn(3, m.d_model))
    assert edit.rank == 3 and torch.allclose(edit.basis @ edit.basis.T, torch.eye(3), atol=1e-5)
    with edit.hooks(m):
        hooked = _logits(m, texts)
    torch.testing.assert_close(_logits(edit.bake(m), texts), hooked, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family,layer", [("llama", 2), ("gpt2", 1), ("llama", 0), ("gpt_neox", 2)])
def test_baked_addition_equals_hooks(family, layer):
    m = st.testing.tiny_model(family)
    texts = m.format(PROMPTS)
    edit = Addition(SteeringVector({layer: torch.randn(m.d_model)}), scale=2.0)
    with edit.hooks(m):
        hooked = _logits(m, texts)
    assert (hooked - _logits(m, texts)).abs().max() > 1e-3
    torch.testing.assert_close(_logits(edit.bake(m), texts), hooked, rtol=0, atol=1e-4)


def test_addition_after_instruction_leaves_the_request_alone():
    m = st.testing.tiny_model("llama")
    layer = 1
    edit = Addition(SteeringVector({layer: torch.randn(m.d_model) * 5}), positions="post_instruction")
    kw = dict(sites="resid_pre", layers=[layer], positions="all", keep="raw", progress=False)
    for side in ("left", "right"):
        plain = st.record(m, PROMPTS, padding_side=side, **kw).raw["resid_pre"]
        with edit.hooks(m):
            steered = st.record(m, PROMPTS, padding_side=side, **kw).raw["resid_pre"]
        n = m.post_instruction_len
        for a, b in zip(plain, steered):
            torch.testing.assert_close(a[:, :-n], b[:, :-n])  # the user's message is untouched
            assert (a[:, -n:] - b[:, -n:]).abs().min() > 0  # the post-instruction tokens are steered
    with edit.hooks(m):
        assert m.generate(PROMPTS, max_new_tokens=5, use_cache=True) == m.generate(PROMPTS, max_new_tokens=5, use_cache=False)


def test_conditional_edits_only_the_sequences_that_pass():
    m = st.testing.tiny_model("llama")
    layer = 1
    torch.manual_seed(0)
    cond = torch.randn(m.d_model)
    scores = Conditional.scores(m, PROMPTS, cond, layer)
    threshold = float(scores.median())
    on = (scores > threshold).tolist()
    assert any(on) and not all(on)
    inner = Addition(SteeringVector({2: torch.randn(m.d_model) * 10}))
    edit = Conditional(inner, cond, layer, threshold)
    plain = m.generate(PROMPTS, max_new_tokens=6, batch_size=4)
    with inner.hooks(m):
        always = m.generate(PROMPTS, max_new_tokens=6, batch_size=4)
    with edit.hooks(m):
        gated = m.generate(PROMPTS, max_new_tokens=6, batch_size=4)
    assert gated == [a if o else p for a, p, o in zip(always, plain, on)]
    assert always != plain
    with pytest.raises(ValueError, match="before the condition"):
        with Conditional(Addition(SteeringVector({0: cond})), cond, layer, threshold).hooks(m):
            pass


def test_conditional_fit_separates_the_two_sets():
    m = st.testing.tiny_model("llama")
    a, b = PROMPTS[:2], PROMPTS[2:]
    cond = (st.record(m, a, layers=[1], progress=False).mean() - st.record(m, b, layers=[1], progress=False).mean())[0, 0]
    fitted = Conditional.fit(m, Addition(SteeringVector({2: cond})), cond, 1, a, b)
    sa, sb = Conditional.scores(m, a, cond, 1), Conditional.scores(m, b, cond, 1)

    def acc(t):
        return float(((sa > t).float().mean() + (sb <= t).float().mean()) / 2)

    every_cut = [float(x) - 1e-4 for x in torch.cat([sa, sb])] + [float(torch.cat([sa, sb]).max()) + 1]
    assert acc(fitted.threshold) == max(acc(t) for t in every_cut)
    assert acc(fitted.threshold) == 1.0  # the difference of means separates the two sets


def test_icv_injection_keeps_the_norm_and_pushes_away():
    m = st.testing.tiny_model("llama")
    v = torch.randn(m.d_model)
    icv = SteeringVector({1: v}, site="resid_post")
    seen = {}

    def spy(x, ctx):
        seen["x"] = x

    with m.hooks({("resid_post", 1): spy}):
        m.forward(m.format(PROMPTS[:1]))
    before = seen["x"]
    with ICVInjection(icv, beta=0.5).hooks(m), m.hooks({("resid_post", 1): spy}):
        m.forward(m.format(PROMPTS[:1]))
    after = seen["x"]
    torch.testing.assert_close(after.norm(dim=-1), before.norm(dim=-1), rtol=1e-5, atol=1e-5)
    unit = v / v.norm()
    assert bool(((after @ unit) < (before @ unit)).all())


def test_edit_files_round_trip(tmp_path):
    m = st.testing.tiny_model("llama")
    texts = m.format(PROMPTS)
    v = SteeringVector({1: torch.randn(m.d_model), 2: torch.randn(m.d_model)}, meta={"method": "test"})
    edits = [Ablation(torch.randn(2, m.d_model)), AffineAblation.fit(m, torch.randn(2, m.d_model), PROMPTS),
             Addition(v, 1.5, "post_instruction"),
             ICVInjection(SteeringVector({1: torch.randn(m.d_model)}, "resid_post"), 0.3),
             Conditional(Addition(v.only([2])), torch.randn(m.d_model), 1, 0.25)]
    for i, edit in enumerate(edits):
        path = tmp_path / f"e{i}.safetensors"
        edit.save(path)
        again = load_edit(path)
        assert type(again) is type(edit)
        with edit.hooks(m):
            want = _logits(m, texts)
        with again.hooks(m):
            torch.testing.assert_close(_logits(m, texts), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not a steering edit"):
        v.save(tmp_path / "v.safetensors")
        load_edit(tmp_path / "v.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_edit(tmp_path / "bad.safetensors")


def test_a_compose_and_a_new_kind_round_trip_through_the_registry(tmp_path):
    m = st.testing.tiny_model("llama")
    texts = m.format(PROMPTS)
    v = SteeringVector({1: torch.randn(m.d_model)})
    both = Compose((Ablation(torch.randn(m.d_model)), Conditional(Addition(v, 2.0), torch.randn(m.d_model), 1, 0.1)))
    both.save(tmp_path / "both.safetensors")
    again = load_edit(tmp_path / "both.safetensors")
    assert [type(e) for e in again.edits] == [Ablation, Conditional]
    with both.hooks(m):
        want = _logits(m, texts)
    with again.hooks(m):
        torch.testing.assert_close(_logits(m, texts), want, rtol=0, atol=0)

    from dataclasses import dataclass

    from steering.edits import KINDS, Edit

    @dataclass(frozen=True, eq=False)
    class Scale(Edit):  # a user's own edit: registered by subclassing
        factor: float
        kind = "test_scale"

        @classmethod
        def from_parts(cls, params, tensors):
            return cls(params["factor"])

        def _hooks(self, model):
            return [(("resid_post", 0), lambda x, ctx: x * self.factor)]

        def _tensors(self):
            return {}

        def _params(self):
            return {"factor": self.factor}

    try:
        Scale(0.5).save(tmp_path / "s.safetensors")
        assert load_edit(tmp_path / "s.safetensors").factor == 0.5
    finally:
        del KINDS["test_scale"]
    with pytest.raises(ValueError, match="unknown edit kind 'test_scale'"):
        load_edit(tmp_path / "s.safetensors")


def test_compose_runs_both_and_model_is_untouched_after():
    m = st.testing.tiny_model("gpt2")
    texts = m.format(PROMPTS)
    before = {k: v.clone() for k, v in m.hf.state_dict().items()}
    a = Ablation(torch.randn(m.d_model))
    b = Addition(SteeringVector({1: torch.randn(m.d_model)}))
    with a.hooks(m), b.hooks(m):
        want = _logits(m, texts)
    with Compose((a, b)).hooks(m):
        torch.testing.assert_close(_logits(m, texts), want, rtol=0, atol=0)
    assert all(torch.equal(before[k], v) for k, v in m.hf.state_dict().items())


def test_addition_at_instruction_end_only_touches_those_prompt_tokens():
    m = st.testing.tiny_model("llama")
    layer, n = 1, m.post_instruction_len
    edit = Addition(SteeringVector({layer: torch.randn(m.d_model) * 5}), positions="instruction_end")
    seen = {"before": [], "after": []}

    def spy(which):
        def hook(x, ctx):
            seen[which].append(x.clone())
        return hook

    with m.hooks({("resid_pre", layer): spy("before")}), edit.hooks(m), m.hooks({("resid_pre", layer): spy("after")}):
        m.generate(PROMPTS, max_new_tokens=3, batch_size=4)
    (pre, *decode_pre), (post, *decode_post) = seen["before"], seen["after"]
    torch.testing.assert_close(post[:, :-n], pre[:, :-n])  # left padding: every prompt ends at the last column
    assert (post[:, -n:] - pre[:, -n:]).abs().amin() > 0
    assert len(decode_pre) == 2 and all(torch.equal(a, b) for a, b in zip(decode_pre, decode_post))
    with pytest.raises(ValueError, match="needs hooks"):
        edit.bake(m)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_affine_ablation_keeps_the_reference_coordinates(family):
    from steering.hooks import attach

    m = st.testing.tiny_model(family)
    texts = m.format(PROMPTS)
    torch.manual_seed(0)
    basis = torch.randn(2, m.d_model)
    edit = AffineAblation.fit(m, basis, PROMPTS)
    assert edit.offsets.shape == (3, m.n_layers, 2) and edit.offsets.abs().max() > 1e-3
    # the offsets are the mean coordinates at the post-instruction tokens (by default)
    from steering.record import record

    for pos in ("post_instruction", "all"):
        rec = record(m, PROMPTS, sites="mlp_out", layers=[1], positions=pos, progress=False).mean("mlp_out")
        fitted = AffineAblation.fit(m, basis, PROMPTS, positions=pos) if pos == "all" else edit
        torch.testing.assert_close(fitted.offsets[edit.sites.index("mlp_out"), 1], rec[0].mean(0) @ edit.basis.T,
                                   rtol=0, atol=1e-5)
    # with zero offsets it is the plain ablation, to the bit
    zero = AffineAblation(basis, torch.zeros_like(edit.offsets))
    with Ablation(basis).hooks(m):
        plain_ablation = _logits(m, texts)
    with zero.hooks(m):
        torch.testing.assert_close(_logits(m, texts), plain_ablation, rtol=0, atol=0)
    # every token entering layer 1 (the edit's hooks run first) has the fitted coordinates
    seen = []
    with edit.hooks(m), attach(m, [(("resid_pre", 1), lambda x, ctx: seen.append(x @ edit.basis.T))]):
        affine = _logits(m, texts)
    target = edit.offsets[edit.sites.index("resid_pre"), 1]
    torch.testing.assert_close(seen[0], target.expand_as(seen[0]), rtol=0, atol=1e-4)
    assert (affine - plain_ablation).abs().max() > 1e-3
    with pytest.raises(ValueError, match="offsets of shape"):
        AffineAblation(basis, torch.zeros(3, m.n_layers, 3))


def test_conditional_refuses_a_layer_the_model_does_not_have():
    m = st.testing.tiny_model("llama")  # 3 layers
    v = SteeringVector({2: torch.randn(m.d_model)})
    with pytest.raises(IndexError, match="layer 5 is out of range"):
        with Conditional(Addition(v), torch.randn(m.d_model), 5, 0.0).hooks(m):
            pass
    with Conditional(Addition(v), torch.randn(m.d_model), -1, 0.0).hooks(m):  # -1: the last layer
        m.generate(["Hi"], max_new_tokens=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_projections_give_the_same_values_whatever_slice_they_are_computed_in(dtype):
    """A streamed bake projects a weight in slices (rows, or columns that start at multiples of
    COLUMN_BLOCK), the in-memory bake the whole weight: the bytes must be the same. A matrix
    product picks its kernel, and so its order of additions, by the shapes (on some CPUs its
    results change with the number of rows), so the projections must not rest on one."""
    from steering.edits.ablation import COLUMN_BLOCK, project_out_, project_rows_

    g = torch.Generator().manual_seed(0)
    for n, d, k in [(301, 67, 1), (257, 130, 3), (5, 300, 2), (700, 33, 4)]:
        w, q = torch.randn(n, d, generator=g, dtype=dtype), torch.randn(k, d, generator=g, dtype=dtype)
        whole = project_rows_(w.clone(), q)
        exact = w - (w.double() @ q.double().T @ q.double()).to(dtype)
        assert (whole - exact).abs().max() < 1e-3
        for cut in (1, 3, 7, 64):
            assert torch.equal(torch.cat([project_rows_(w[i:i + cut].clone(), q) for i in range(0, n, cut)]), whole)
        wt = w.T.contiguous()  # [d, n], out_in: W − QᵀQW mixes rows; sliced by columns
        whole = project_out_(wt.clone(), q, "out_in")
        assert (whole - (wt - (q.double().T @ (q.double() @ wt.double())).to(dtype))).abs().max() < 1e-3
        for cut in (COLUMN_BLOCK, 2 * COLUMN_BLOCK, 5 * COLUMN_BLOCK):
            got = torch.cat([project_out_(wt[:, i:i + cut].clone(), q, "out_in") for i in range(0, n, cut)], 1)
            assert torch.equal(got, whole)
