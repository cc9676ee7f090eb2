"""Baked edits written as Hugging Face folders: loadable, with provenance, never over a source."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import steering as st
from steering.checkpoint import read_provenance, write_hf
from steering.edits import Ablation, Addition
from steering.vectors import SteeringVector

PROMPTS = ["How do I bake bread?", "Hi"]


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
def test_baked_folder_loads_and_matches(family, tmp_path):
    m = st.testing.tiny_model(family)
    texts = m.format(PROMPTS)
    edit = Ablation(torch.randn(2, m.d_model))
    baked = edit.bake(m)
    out = write_hf(baked, tmp_path / "out", {"method": "ablation", "rank": 2})
    again = st.load(out)
    torch.testing.assert_close(again.forward(texts), baked.forward(texts), rtol=0, atol=1e-5)
    prov = read_provenance(out)
    assert prov["method"] == "ablation" and prov["rank"] == 2 and "steering_version" in prov
    assert "Provenance" in (out / "README.md").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_new_bias_is_declared_so_it_survives_loading(tmp_path):
    m = st.testing.tiny_model("llama")  # Llama's MLP has no bias
    texts = m.format(PROMPTS)
    edit = Addition(SteeringVector({2: torch.randn(m.d_model)}), 3.0)
    with edit.hooks(m):
        want = m.forward(texts)
    out = write_hf(edit.bake(m), tmp_path / "out", {"method": "addition"})
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.config.mlp_bias is True
    assert read_provenance(out)["config_flags_turned_on"] == ["mlp_bias"]
    torch.testing.assert_close(st.load(out).forward(texts), want, rtol=0, atol=1e-4)


def test_refuses_existing_output_and_output_inside_source(tmp_path):
    m = st.testing.tiny_model("gpt2")
    src = write_hf(m, tmp_path / "src", {"method": "copy"})
    loaded = st.load(src)
    for target in (src, src / "sub"):  # never over or into a source, even when told to overwrite
        with pytest.raises(ValueError, match="inside the source"):
            write_hf(loaded, target, {"method": "x"}, overwrite=True)
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    write_hf(loaded, tmp_path / "other", {"method": "x"})
    with pytest.raises(FileExistsError, match="exists"):
        write_hf(loaded, tmp_path / "other", {"method": "x"})
    assert before == {p.name: p.stat().st_mtime_ns for p in src.iterdir()}  # the source was never written to
    write_hf(loaded, tmp_path / "other", {"method": "y"}, overwrite=True)
    assert read_provenance(tmp_path / "other")["method"] == "y"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "src"]
