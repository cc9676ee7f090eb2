"""Steering vectors: arithmetic, safetensors and GGUF files, extraction on tiny models."""

import pytest
import torch

import steering as st
from steering.extract import diff_in_means, icv, icv_pairs, pca_direction
from steering.vectors import Candidates, SteeringVector


def _vec(d=16, layers=(1, 2, 3)):
    torch.manual_seed(0)
    return SteeringVector({l: torch.randn(d) for l in layers}, meta={"method": "diff_in_means", "model": "x"})


def test_arithmetic():
    a, b = _vec(), _vec()
    assert torch.equal((a - b)[2], torch.zeros(16))
    assert torch.equal((2 * a)[1], a[1] * 2) and torch.equal((a * 2)[1], a[1] * 2)
    assert torch.equal((-a)[3], -a[3]) and torch.allclose((a / 4)[3], a[3] / 4)
    assert torch.allclose((a + a.only([1]))[1], 2 * a[1]) and torch.equal((a + a.only([1]))[2], a[2])
    assert all(abs(float(v.norm()) - 1) < 1e-6 for v in a.normalized().directions.values())
    with pytest.raises(ValueError, match="different sites"):
        a + SteeringVector({1: torch.ones(16)}, site="resid_post")
    with pytest.raises(KeyError, match=r"\[7\]"):
        a.only([7])


def test_safetensors_round_trip_with_provenance(tmp_path):
    a = _vec()
    a.save(tmp_path / "v.safetensors")
    b = SteeringVector.load(tmp_path / "v.safetensors")
    assert b.meta == a.meta and b.site == a.site and b.layers == a.layers
    assert all(torch.equal(a[l], b[l]) for l in a.layers)
    with pytest.raises(FileNotFoundError, match="nope"):
        SteeringVector.load(tmp_path / "nope.safetensors")


def test_save_layers_sharing_one_tensor(tmp_path):
    """Layers holding the same tensor object (or overlapping views of one storage) save and load back equal."""
    v, m = torch.randn(16), torch.randn(3, 16)
    for i, a in enumerate([SteeringVector({1: v, 2: v}, meta={"method": "shared"}),
                           SteeringVector({0: m[0], 1: m[0], 2: m[1], 3: m.view(-1)[:16]})]):
        a.save(tmp_path / f"{i}.safetensors")
        b = SteeringVector.load(tmp_path / f"{i}.safetensors")
        assert b.layers == a.layers and b.meta == a.meta
        assert all(torch.equal(a[l], b[l]) for l in a.layers)
    assert torch.equal(v, SteeringVector.load(tmp_path / "0.safetensors")[2])  # the vector itself is untouched


def test_gguf_round_trip_is_exact(tmp_path):
    a = _vec(layers=(2, 3, 5))
    a.to_gguf(tmp_path / "v.gguf", model_hint="llama")
    b = SteeringVector.from_gguf(tmp_path / "v.gguf")
    assert b.layers == a.layers and b.meta["model_hint"] == "llama"
    assert all(torch.equal(a[l], b[l]) for l in a.layers)
    post = SteeringVector({1: torch.ones(16)}, site="resid_post")
    post.to_gguf(tmp_path / "p.gguf")
    assert SteeringVector.from_gguf(tmp_path / "p.gguf", site="resid_post").layers == [1]
    with pytest.raises(ValueError, match="no control-vector slot"):
        _vec(layers=(1,)).to_gguf(tmp_path / "bad.gguf")  # resid_pre of layer 1 = after block 0
    assert not (tmp_path / "bad.gguf").exists()


def test_diff_in_means_matches_recorded_means():
    m = st.testing.tiny_model("llama")
    harmful, harmless = ["How do I pick a lock?", "Make a weapon now"], ["Bake bread", "Write a poem about the sea"]
    c = diff_in_means(m, harmful, harmless, progress=False)
    assert c.vectors.shape == (m.n_layers, m.post_instruction_len, m.d_model) and c.positions == (-2, -1)
    want = st.record(m, harmful, positions="post_instruction", progress=False).mean() - \
        st.record(m, harmless, positions="post_instruction", progress=False).mean()
    torch.testing.assert_close(c.vectors, want)
    assert c.meta["harmful_hash"] != c.meta["harmless_hash"]
    torch.testing.assert_close(c.direction(1, -1), want[1, 1])


def test_candidates_round_trip(tmp_path):
    c = Candidates(torch.randn(3, 2, 8), (-2, -1), meta={"model": "m"})
    c.save(tmp_path / "c.safetensors")
    d = Candidates.load(tmp_path / "c.safetensors")
    assert torch.equal(c.vectors, d.vectors) and d.positions == (-2, -1) and d.meta == {"model": "m"}
    for view in (torch.randn(5, 3, 2, 8)[1], torch.randn(1, 2, 8).expand(3, 2, 8), torch.randn(2, 3, 8).transpose(0, 1)):
        Candidates(view, (-2, -1)).save(tmp_path / "v.safetensors")  # one tensor: views save as their own values
        assert torch.equal(Candidates.load(tmp_path / "v.safetensors").vectors, view)


def test_pca_direction_points_with_the_mean_difference():
    m = st.testing.tiny_model("gpt2")
    pos = ["Tell me how to steal a car", "How to hurt someone", "Explain making a bomb"]
    neg = ["Tell me how to wash a car", "How to help someone", "Explain making a cake"]
    v = pca_direction(m, pos, neg, layers=[1, 2])
    mean = st.record(m, pos, layers=[1, 2], progress=False).mean()[:, 0] - st.record(m, neg, layers=[1, 2], progress=False).mean()[:, 0]
    for i, l in enumerate([1, 2]):
        assert float(v[l] @ mean[i]) > 0


def test_icv_shape_and_sign():
    m = st.testing.tiny_model("llama")
    pairs = icv_pairs(["How do I pick a lock?", "How to make poison?", "How to hack a bank?"])
    assert pairs[0][1].endswith("because it is harmful")
    v = icv(m, pairs)
    assert v.layers == list(range(m.n_layers)) and v.site == "resid_post"
    u = st.record(m, [p[0] for p in pairs], sites="resid_post", positions="last:4", chat=False, progress=False).mean("resid_post").mean(1)
    s = st.record(m, [p[1] for p in pairs], sites="resid_post", positions="last:4", chat=False, progress=False).mean("resid_post").mean(1)
    for l in v.layers:
        assert float(v[l] @ (u[l] - s[l])) > 0


def test_kl_per_prompt_rows_and_mean():
    from steering.select import kl_div, kl_per_prompt

    g = torch.Generator().manual_seed(0)
    base = torch.log_softmax(torch.randn(4, 7, generator=g), -1)
    new = base.clone()
    new[2] = torch.log_softmax(torch.randn(7, generator=g), -1)
    rows = kl_per_prompt(base, new)
    assert rows.shape == (4,) and rows[[0, 1, 3]].abs().max() < 1e-7 and rows[2] > 0
    p, q = base[2].exp(), new[2].exp()
    assert torch.allclose(rows[2], (p * (p / q).log()).sum(), atol=1e-6)
    assert abs(kl_div(base, new) - float(rows.mean())) < 1e-7


def test_select_direction_scores_the_affine_form_when_asked():
    """`affine=True` scores each candidate's KL with AffineAblation.fit on the harmless prompts
    (coordinates kept at their mean), not with the plain ablation."""
    from steering.edits import Ablation, AffineAblation
    from steering.select import kl_div, last_logprobs, select_direction
    from steering.testing import tiny_model

    m = tiny_model("llama")
    harmful, harmless = ["how do I pick a lock", "make a weapon now"], ["bake a cake", "plant a tree", "write a poem"]
    cands = diff_in_means(m, harmful, harmless, progress=False)
    plain = select_direction(m, cands, harmful, harmless, kl_threshold=float("inf"), progress=False)
    affine = select_direction(m, cands, harmful, harmless, kl_threshold=float("inf"), progress=False, affine=True)
    assert plain.meta["ablation"] == "directional" and affine.meta["ablation"] == "affine"
    row = next(r for r in affine.rows if r["layer"] == 1 and r["position"] == -1)
    base, r = last_logprobs(m, harmless), cands.direction(1, -1)
    with AffineAblation.fit(m, r, harmless).hooks(m):
        assert abs(row["kl"] - kl_div(base, last_logprobs(m, harmless))) < 1e-6
    with Ablation(r).hooks(m):
        plain_kl = kl_div(base, last_logprobs(m, harmless))
    assert abs(next(x for x in plain.rows if (x["layer"], x["position"]) == (1, -1))["kl"] - plain_kl) < 1e-6
    assert abs(row["kl"] - plain_kl) > 1e-6
