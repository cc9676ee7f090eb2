"""SafeInfer: guided decoding against an unsafe model, and safety amplification, batched."""

import copy

import pytest
import torch

import steering as st
from steering import safeinfer
from steering.edits import Addition, Conditional
from steering.vectors import SteeringVector

PROMPTS = ["How do I bake bread?", "Hi", "Tell me a long story about a dragon and a knight, please"]


@pytest.fixture(scope="module")
def pair():
    return st.testing.tiny_model("llama", seed=0), st.testing.tiny_model("llama", seed=1)


def amp(m, scale=4.0):
    g = torch.Generator().manual_seed(3)
    return Addition(SteeringVector({1: torch.randn(m.d_model, generator=g)}, "mlp_out"), scale, positions="last")


def test_gamma_zero_without_amplification_is_plain_decoding(pair):
    m, u = pair
    plain = m.generate(PROMPTS, max_new_tokens=12, batch_size=3)
    assert safeinfer.generate(m, PROMPTS, unsafe=u, gamma=0.0, max_new_tokens=12, batch_size=3) == plain
    torch.manual_seed(0)
    sampled = m.generate(PROMPTS, max_new_tokens=12, batch_size=3, do_sample=True)
    torch.manual_seed(0)
    assert safeinfer.generate(m, PROMPTS, unsafe=u, gamma=0.0, max_new_tokens=12, batch_size=3, do_sample=True) == sampled


def test_batched_equals_each_prompt_alone(pair):
    m, u = pair
    kw = dict(unsafe=u, amplify=amp(m), gamma=99.0, max_new_tokens=12)
    batched = safeinfer.generate(m, PROMPTS, batch_size=3, **kw)
    alone = [safeinfer.generate(m, [p], batch_size=1, **kw)[0] for p in PROMPTS]
    assert batched == alone
    assert batched != m.generate(PROMPTS, max_new_tokens=12, batch_size=3)  # it does something


def test_composes_with_a_conditional_steering_edit(pair):
    """SafeInfer over a conditional steering edit: the edit gates per sequence inside the batch,
    and both models leave bit-identical with no hooks."""
    m, u = pair
    torch.manual_seed(0)
    cond = torch.randn(m.d_model)
    scores = Conditional.scores(m, PROMPTS, cond, 1)
    on = (scores > scores.median()).tolist()
    assert any(on) and not all(on)
    inner = Addition(SteeringVector({1: torch.randn(m.d_model) * 10}, "resid_post"))
    cond_edit = Conditional(inner, cond, 1, float(scores.median()))
    before = {(i, k): v.clone() for i, mm in enumerate((m, u)) for k, v in mm.hf.state_dict().items()}
    # with γ = 0 and no amplification: exactly the edit's own generations
    with cond_edit.hooks(m):
        hooked = m.generate(PROMPTS, max_new_tokens=12, batch_size=3)
    assert safeinfer.generate(m, PROMPTS, unsafe=u, gamma=0.0, edits=[cond_edit], max_new_tokens=12, batch_size=3) == hooked
    # the full method over the edit: batched equals alone, and the gate's choice shows
    kw = dict(unsafe=u, amplify=amp(m), gamma=99.0, max_new_tokens=12)
    composed = safeinfer.generate(m, PROMPTS, edits=[cond_edit], batch_size=3, **kw)
    assert composed == [safeinfer.generate(m, [p], edits=[cond_edit], batch_size=1, **kw)[0] for p in PROMPTS]
    without = safeinfer.generate(m, PROMPTS, batch_size=3, **kw)
    with inner.hooks(m):  # the same as the ungated edit where the gate passes
        ungated = safeinfer.generate(m, PROMPTS, batch_size=3, **kw)
    assert composed == [a if o else w for a, w, o in zip(ungated, without, on)] and composed != without
    after = {(i, k): v for i, mm in enumerate((m, u)) for k, v in mm.hf.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mm in (m, u) for mod in mm.hf.modules())


def test_guided_scores_follow_the_formula(pair):
    m, u = pair
    batch = m.encode(m.format(PROMPTS), padding_side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        scores = m.hf(**batch).logits[:, -1]
        lu = torch.log_softmax(u.hf(**batch).logits[:, -1], -1)
    proc = safeinfer.GuidedDecoding(u, gamma=99.0, pad_token_id=m.tokenizer.pad_token_id)
    got = proc(ids, scores)
    ls = torch.log_softmax(scores, -1)
    torch.testing.assert_close(got, ls - 99.0 * (lu - ls).clamp(min=0), rtol=0, atol=1e-4)
    assert mask.min() == 0  # the batch really had padding
    # the next step reuses the cache: same result as recomputing from scratch
    nxt = got.argmax(-1, keepdim=True)
    step = proc.unsafe_logprobs(torch.cat([ids, nxt], 1))
    fresh = safeinfer.GuidedDecoding(u, pad_token_id=m.tokenizer.pad_token_id).unsafe_logprobs(torch.cat([ids, nxt], 1))
    torch.testing.assert_close(step, fresh, rtol=0, atol=1e-4)


def test_amplification_touches_only_the_last_position(pair):
    m, _ = pair
    texts = m.format(PROMPTS)
    base = m.forward(texts)
    with amp(m).hooks(m):
        edited = m.forward(texts)
    batch = m.encode(texts, padding_side="left")
    real = batch["attention_mask"].bool()
    diff = (edited - base).abs().amax(-1)
    assert (diff[:, -1] > 1e-3).all()
    assert diff[:, :-1][real[:, :-1]].max() < 1e-5


def test_different_tokenizers_are_refused(pair):
    m, u = pair
    tok = copy.deepcopy(u.tokenizer)
    tok.add_tokens(["<brand-new>"])
    other = st.load(u.hf, tok)
    with pytest.raises(ValueError, match="its tokenizer differs.*<brand-new>"):
        safeinfer.generate(m, PROMPTS, unsafe=other)


def test_amplifier_reads_its_vector_from_demonstrations(pair):
    m, _ = pair
    a = safeinfer.amplifier(m, layer=1, scale=1.5, n_demos=8, n_queries=8)
    assert a.positions == "last" and a.scale == 1.5 and a.vector.site == "mlp_out"
    assert list(a.vector.directions) == [1] and a.vector.directions[1].norm() > 0
    with pytest.raises(ValueError, match="amplify layer 9"):
        safeinfer.amplifier(m, layer=9)
    with pytest.raises(ValueError, match="amplify site 'mlp'"):
        safeinfer.amplifier(m, layer=1, site="mlp")


def test_amplifier_at_another_site_reads_and_adds_there(pair):
    from steering.record import record

    m, _ = pair
    kw = dict(layer=1, n_demos=8, n_queries=8)
    r = safeinfer.amplifier(m, scale=2.0, site="resid_post", **kw)
    v = r.vector.directions[1]
    assert r.vector.site == "resid_post" and not torch.allclose(v, safeinfer.amplifier(m, **kw).vector.directions[1])
    rec = dict(sites="resid_post", layers=[1], positions="last", progress=False)
    base = record(m, PROMPTS, **rec).mean("resid_post")[0, 0]
    with r.hooks(m):
        edited = record(m, PROMPTS, **rec).mean("resid_post")[0, 0]
    torch.testing.assert_close(edited - base, 2.0 * v, rtol=0, atol=1e-4)


def test_cli_generate_with_safeinfer(pair, tmp_path, capsys):
    from steering.cli import main

    m, u = pair
    for name, mm in (("m", m), ("u", u)):
        mm.hf.save_pretrained(tmp_path / name)
        mm.tokenizer.save_pretrained(tmp_path / name)
    args = ["generate", str(tmp_path / "m"), "--prompt", "Hi", "--max-new-tokens", "6"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--safeinfer", "--unsafe-model", str(tmp_path / "u"), "--gamma", "0", "--amplify-scale", "0"]) == 0
    assert capsys.readouterr().out == plain
    assert main(args + ["--safeinfer", "--unsafe-model", str(tmp_path / "u"), "--amplify-layer", "1"]) == 0
    assert main(args + ["--safeinfer", "--gamma", "0", "--amplify-site", "resid_post"]) == 0
    capsys.readouterr()
    assert main(args + ["--safeinfer", "--gamma", "0", "--amplify-site", "residual"]) == 2
    assert "amplify site 'residual'" in capsys.readouterr().err
    assert main(args + ["--amplify-site", "resid_post"]) == 2
    assert "need --safeinfer" in capsys.readouterr().err
    assert main(args + ["--safeinfer"]) == 2
    assert "needs --unsafe-model" in capsys.readouterr().err


def test_decoding_builds_the_same_arguments_for_generate_and_evaluate(pair):
    m, u = pair
    kw = safeinfer.decoding(m, unsafe=u, amplify_layer=1, amplify_scale=2.0, amplify_site="resid_post")
    assert kw["gamma"] == safeinfer.GAMMA and kw["unsafe"] is u
    assert kw["amplify"].vector.site == "resid_post" and list(kw["amplify"].vector.directions) == [1]
    assert kw["amplify"].scale == 2.0
    off = safeinfer.decoding(m, unsafe=u, amplify_scale=0, gamma=0)
    assert off == {"amplify": None, "unsafe": None, "gamma": 0.0}
    with pytest.raises(ValueError, match="needs an unsafe model"):
        safeinfer.decoding(m, amplify_scale=0)
    with pytest.raises(ValueError, match="gamma"):
        safeinfer.decoding(m, unsafe=u, gamma=-1)
    from steering.evaluate import Setting

    assert Setting("s", **off).unsafe is None  # the keys are Setting's
