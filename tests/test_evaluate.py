"""steering.evaluate and `steering eval` on tiny models: the metrics mean what they say."""

import json

import pytest
import torch

import steering as st
from steering.cli import main
from steering.edits import Addition
from steering.evaluate import Report, Setting, evaluate
from steering.judge import substring_judge
from steering.vectors import SteeringVector

SETS = {"harmful": "harmful:test", "xstest_safe": "xstest:safe", "xstest_unsafe": "xstest:unsafe"}


@pytest.fixture(scope="module")
def model():
    return st.testing.tiny_model("llama")


def test_plain_setting_has_zero_kl_and_judge_is_pluggable(model):
    always = lambda prompts, outs: [True] * len(outs)  # noqa: E731
    rep = evaluate(model, [Setting("plain")], sets=SETS, limit=6, n_utility=5, max_new_tokens=4, judge=always, progress=False)
    r = rep.rows["plain"]
    assert r["kl"] == pytest.approx(0.0, abs=1e-6)
    assert r["harmful_refusal"] == 1.0 and r["xstest_over_refusal"] == 1.0 and r["xstest_compliance"] == 0.0
    assert r["ce"] > 0


def test_edit_moves_kl_and_ce_and_plots(model, tmp_path):
    v = SteeringVector({1: 5 * torch.randn(model.d_model)})
    rep = evaluate(model, [Setting("plain"), Setting("added", edits=[Addition(v, 1.0)])], sets=SETS, limit=4,
                   n_utility=6, max_new_tokens=4, judge=substring_judge, progress=False)
    assert rep.rows["added"]["kl"] > 0.01 and rep.rows["added"]["ce"] > rep.rows["plain"]["ce"]
    out = rep.save(tmp_path / "r")
    assert json.loads((out / "report.json").read_text())["rows"]["added"]["kl"] == rep.rows["added"]["kl"]
    assert "| added |" in (out / "report.md").read_text() and (out / "report.png").stat().st_size > 1000


def test_references_default_to_the_models_own_greedy_completions(model):
    prompts = ["Hi", "How do I bake bread?"]
    refs = model.generate(prompts, max_new_tokens=6)
    a = evaluate(model, sets={}, utility_prompts=prompts, max_new_tokens=6, progress=False)
    b = evaluate(model, sets={}, utility_prompts=prompts, references=refs, max_new_tokens=6, progress=False)
    c = evaluate(model, sets={}, utility_prompts=prompts, references=["zzzz qqqq", "xx yy"], max_new_tokens=6, progress=False)
    assert a.rows["plain"]["ce"] == pytest.approx(b.rows["plain"]["ce"])
    assert c.rows["plain"]["ce"] > a.rows["plain"]["ce"]


def test_duplicate_names_refused(model):
    with pytest.raises(ValueError, match="names must differ"):
        evaluate(model, [Setting("a"), Setting("a")], progress=False)


def test_cli_eval_writes_the_report(model, tmp_path, capsys):
    folder = tmp_path / "m"
    model.hf.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    edit = Addition(SteeringVector({1: torch.randn(model.d_model)}), 2.0)
    edit.save(tmp_path / "add.safetensors")
    assert main(["eval", str(folder), "--edit", str(tmp_path / "add.safetensors"), "--compare", str(folder),
                 "--limit", "3", "--n-utility", "3", "--max-new-tokens", "3", "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "| plain |" in out and "| add |" in out and "| m |" in out
    rows = json.loads((tmp_path / "rep" / "report.json").read_text())["rows"]
    assert rows["m"]["kl"] == pytest.approx(0.0, abs=1e-6)  # the same weights, loaded again
    assert Report(rows).table() in out  # the table printed is the one the saved rows make
    # SafeInfer's options without --safeinfer: one line, before anything loads or is written
    assert main(["eval", str(tmp_path / "missing"), "--unsafe-model", str(folder), "--out", str(tmp_path / "rep2")]) == 2
    assert "need --safeinfer" in capsys.readouterr().err and not (tmp_path / "rep2").exists()


def test_cross_entropy_counts_only_completion_tokens_without_a_chat_template(model):
    """Without a chat template encode() adds BOS; the prompt/completion boundary must account for it."""
    from steering.evaluate import _cross_entropy

    plain = st.load(model.hf, model.tokenizer)
    tok = copy_without_template(model.tokenizer)
    m = st.load(model.hf, tok)
    assert not m.has_chat_template
    p, c = "Hello there", " friend"
    ids = m.encode([p + c], padding_side="right")["input_ids"][0]
    with torch.no_grad():
        logp = torch.log_softmax(m.hf(input_ids=ids[None]).logits.float(), -1)[0]
    n_c = len(tok(c, add_special_tokens=False)["input_ids"])
    want = -float(logp[len(ids) - n_c - 1:len(ids) - 1].gather(-1, ids[-n_c:, None]).sum()) / n_c
    assert _cross_entropy(m, [p], [c], 1) == pytest.approx(want, rel=1e-5)
    assert plain.has_chat_template


def copy_without_template(tok):
    """The tokenizer without a chat template, adding BOS as most base models' tokenizers do."""
    import copy

    from tokenizers.processors import TemplateProcessing

    t = copy.deepcopy(tok)
    t.chat_template = None
    t._tokenizer.post_processor = TemplateProcessing(single=f"{t.bos_token} $A", special_tokens=[(t.bos_token, t.bos_token_id)])
    assert t("Hi")["input_ids"][0] == t.bos_token_id
    return t


def test_plot_sweep_draws_curves(tmp_path):
    from steering.evaluate import plot_sweep

    pts = [{"scale": s, "harmful_refusal": s / 10, "kl": s * s} for s in (3, 1, 2)]
    path = plot_sweep(pts, "scale", ["harmful_refusal", "kl"], tmp_path / "sweep.png", title="t")
    assert path.stat().st_size > 1000
    with pytest.raises(KeyError):
        plot_sweep(pts, "scale", ["missing"], tmp_path / "x.png")
