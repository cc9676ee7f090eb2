"""Recording: reductions, positions, memory that does not grow with the number of prompts."""

import gc

import pytest
import torch
from safetensors import safe_open

import steering as st
from steering.record import save_recording


@pytest.fixture(scope="module")
def model():
    return st.testing.tiny_model("llama")


def _tensors_alive():
    return sum(1 for o in gc.get_objects() if type(o) is torch.Tensor)


def test_reduction_state_does_not_grow_with_prompts(model):
    short = [f"Question number {i}?" for i in range(2000)]
    small = st.record(model, short[:200], sites=["resid_pre", "mlp_out"], positions="last:2", batch_size=64, progress=False)
    gc.collect()
    before = _tensors_alive()
    big = st.record(model, short, sites=["resid_pre", "mlp_out"], positions="last:2", batch_size=64, progress=False)
    gc.collect()
    assert big.n_prompts == 2000 and small.n_prompts == 200
    assert big.state_nbytes() == small.state_nbytes() == 2 * (3 * 2 * 32 * 8 + 2 * 8)
    assert big.raw == {} and _tensors_alive() - before < 20  # nothing per prompt survives
    # and the means are the means: the first 200 of the big run reproduce the small run
    torch.testing.assert_close(small.mean("resid_pre"),
                               st.record(model, short[:200], positions="last:2", batch_size=200, progress=False).mean("resid_pre"),
                               rtol=1e-5, atol=1e-6)


def test_positions(model):
    assert model.post_instruction_len == 2  # "<|end|><|assistant|>"
    prompts = ["How do I bake bread?", "Hi there"]
    rec = st.record(model, prompts, positions="post_instruction", keep="raw", progress=False)
    assert rec.mean().shape == (model.n_layers, 2, model.d_model)
    last = st.record(model, prompts, positions="last", keep="raw", progress=False)
    torch.testing.assert_close(last.raw["resid_pre"][0][:, 0], rec.raw["resid_pre"][0][:, 1])
    every = st.record(model, prompts, positions="all", keep="raw", progress=False)
    n_tokens = [len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in model.format(prompts)]
    assert [r.shape[1] for r in every.raw["resid_pre"]] == n_tokens
    torch.testing.assert_close(every.raw["resid_pre"][1][:, -1], last.raw["resid_pre"][1][:, 0])
    sub = st.record(model, prompts, layers=[-1], progress=False)
    assert sub.layers == [model.n_layers - 1]


def test_chat_template_is_applied_and_can_be_turned_off(model):
    text = model.format(["Hello"])[0]
    assert text == "<|bos|><|user|>Hello<|end|><|assistant|>"
    assert model.format(["Hello"], chat=False) == ["Hello"]
    a = st.record(model, ["Hello"], positions="last", chat=False, keep="raw", progress=False)
    b = st.record(model, ["Hello"], positions="last", keep="raw", progress=False)
    assert not torch.allclose(a.raw["resid_pre"][0], b.raw["resid_pre"][0])


def test_bad_arguments_name_themselves(model):
    with pytest.raises(ValueError, match="positions='middle'"):
        st.record(model, ["a"], positions="middle", progress=False)
    with pytest.raises(ValueError, match="unknown site 'resid'"):
        st.record(model, ["a"], sites="resid", progress=False)
    with pytest.raises(ValueError, match="fewer than the 50 positions"):
        st.record(model, ["a"], positions="last:50", progress=False)
    with pytest.raises(ValueError, match="no prompts"):
        st.record(model, [], progress=False)
    with pytest.raises(KeyError, match="not recorded"):
        st.record(model, ["a b c"], progress=False).mean("mlp_out")


def test_prompt_set_names_work_in_record(model):
    rec = st.record(model, "xstest:safe:test", positions="last", progress=False)
    assert rec.n_prompts == len(st.datasets.load("xstest:safe:test")) > 0


def test_recording_file_round_trips_with_metadata(model, tmp_path):
    rec = st.record(model, ["How do I bake bread?", "Hi"], sites=["resid_pre", "attn_out"], positions="last:2", progress=False)
    path = tmp_path / "sub" / "rec.safetensors"
    save_recording(rec, str(path), "tiny")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert meta["format"] == "steering.recording" and meta["n_prompts"] == "2" and meta["positions"] == "last:2"
        torch.testing.assert_close(f.get_tensor("attn_out.mean"), rec.mean("attn_out"))
    assert [p.name for p in path.parent.iterdir()] == ["rec.safetensors"]  # no temp file left
