"""Baked edits written as Hugging Face folders: loadable, with provenance, never over a source."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import steering as st
from steering.weights import Checkpoint
from steering.weights.bake import read_provenance, write_hf
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
        with pytest.raises(ValueError, match="(is|inside) the input"):
            write_hf(loaded, target, {"method": "x"}, overwrite=True)
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    write_hf(loaded, tmp_path / "other", {"method": "x"})
    with pytest.raises(FileExistsError, match="exists"):
        write_hf(loaded, tmp_path / "other", {"method": "x"})
    assert before == {p.name: p.stat().st_mtime_ns for p in src.iterdir()}  # the source was never written to
    write_hf(loaded, tmp_path / "other", {"method": "y"}, overwrite=True)
    assert read_provenance(tmp_path / "other")["method"] == "y"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "src"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bake_of_a_sharded_folder_keeps_its_shards_and_dtype(family, tmp_path):
    """A model loaded from a local folder is written through the one streaming writer: the
    source's shard names and dtypes stay, new tensors (untied unembedding, declared bias) go into
    the last shard, the edited config replaces the source's, and it loads to the same logits."""
    import json

    src = tmp_path / "src"
    m0 = st.testing.tiny_model(family)
    m0.hf.to(torch.bfloat16).save_pretrained(src, max_shard_size="40KB")
    m0.tokenizer.save_pretrained(src)
    m = st.load(src)
    texts = m.format(PROMPTS)
    edit_a = Ablation(torch.randn(1, m.d_model))
    baked = Addition(SteeringVector({1: torch.randn(m.d_model)}), 2.0).bake(edit_a.bake(m))
    out = write_hf(baked, tmp_path / "out", {"method": "ablation+addition"})
    shards = lambda d: sorted(p.name for p in d.glob("*.safetensors"))  # noqa: E731
    assert shards(out) == shards(src) and len(shards(src)) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    again = st.load(out)
    assert {p.dtype for p in again.hf.parameters()} == {torch.bfloat16}
    assert set(index) >= set(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"])
    torch.testing.assert_close(again.forward(texts), baked.forward(texts), rtol=0, atol=0)
    assert read_provenance(out)["method"] == "ablation+addition"
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral", "qwen2", "gpt_neox"])
@pytest.mark.parametrize("chunk", [None, 96], ids=["whole", "sliced"])
@pytest.mark.parametrize("ahead", [False, True], ids=["in-turn", "ahead"])
def test_streamed_orthogonalisation_equals_the_in_memory_bake(family, chunk, ahead, tmp_path, monkeypatch):
    """``bake_ablation_stream`` edits a folder tensor by tensor (the model is never loaded) and
    writes what ``Ablation.bake`` + ``write_hf`` write: same tensors (bf16, sharded), same logits,
    a tied unembedding untied in the config; refuses what the in-memory bake refuses. ``sliced``:
    every tensor it edits is worked on in slices of 96 entries (as a large model's are);
    ``ahead``: each projected in a thread of its own while the ones before it are written (what
    happens once the checkpoint's fingerprint is known; here it is being hashed)."""
    from safetensors.torch import load_file

    import steering.weights.bake as bake_mod
    import steering.weights.files as files_mod
    from steering.weights.bake import bake_ablation_stream
    from steering.cli import main

    if chunk:
        monkeypatch.setattr(bake_mod, "_CHUNK", chunk)
    monkeypatch.setattr(files_mod, "being_hashed", lambda ck: not ahead)
    calls = []
    real_ahead = bake_mod._Ahead
    monkeypatch.setattr(bake_mod, "_Ahead", lambda *a: calls.append(1) or real_ahead(*a))

    src = tmp_path / "src"
    m0 = st.testing.tiny_model(family)
    m0.hf.to(torch.bfloat16).save_pretrained(src, max_shard_size="40KB")
    m0.tokenizer.save_pretrained(src)
    m = st.load(src)
    edit = Ablation(torch.randn(2, m.d_model))
    if m.map.spec.post_norm:
        with pytest.raises(Exception, match="normalised"):
            bake_ablation_stream(edit, src, tmp_path / "streamed")
        return
    want = write_hf(edit.bake(m), tmp_path / "memory", {"method": "bake"})
    edit.save(tmp_path / "abl.safetensors")
    assert main(["bake", str(src), "--edit", str(tmp_path / "abl.safetensors"), "--out", str(tmp_path / "streamed")]) == 0
    got = tmp_path / "streamed"
    tensors = lambda d: {k: v for p in sorted(d.glob("*.safetensors")) for k, v in load_file(p).items()}  # noqa: E731
    a, b = tensors(want), tensors(got)
    assert set(a) == set(b) and any(not torch.equal(b[k], v) for k, v in tensors(src).items())
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), rtol=0, atol=0, msg=k)
    texts = m.format(PROMPTS)
    with edit.hooks(m):
        hooked = m.forward(texts)
    torch.testing.assert_close(st.load(got).forward(texts).float(), st.load(want).forward(texts).float(), rtol=0, atol=0)
    assert (st.load(got).forward(texts).float() - hooked.float()).abs().max() < 0.1  # bf16 weights vs hooks
    assert read_provenance(got).get("stream", False) is (family != "mixtral")  # MoE experts are stored unfused: it falls back
    assert bool(calls) is (ahead and family != "mixtral")
    if family == "mixtral":
        with pytest.raises(ValueError, match="experts.*names differ"):
            bake_ablation_stream(edit, src, tmp_path / "x")
    with pytest.raises(ValueError, match="every layer"):
        bake_ablation_stream(Ablation(torch.randn(1, m.d_model), layers=(0,)), src, tmp_path / "x")


def test_a_streamed_bake_plans_an_architecture_once(tmp_path, monkeypatch):
    """The tensors a streamed bake edits come from a meta-device model built once per config and
    cached; a second bake of the same architecture builds nothing and writes the same bytes."""
    import transformers

    from steering.weights.bake import bake_ablation_stream, stream_plan

    monkeypatch.setenv("STEERING_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    m0 = st.testing.tiny_model("llama")
    m0.hf.to(torch.bfloat16).save_pretrained(src, max_shard_size="40KB")
    edit = Ablation(torch.randn(1, m0.d_model))
    first = bake_ablation_stream(edit, src, tmp_path / "a")
    assert len(list((tmp_path / "cache" / "plans").glob("*.json"))) == 1

    def refuse(*a, **k):
        raise AssertionError("built the model again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", refuse)
    second = bake_ablation_stream(edit, src, tmp_path / "b")
    ck_a, ck_b = Checkpoint(first), Checkpoint(second)
    assert all(torch.equal(ck_a.get(n), ck_b.get(n)) for n in ck_a.names)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": cfg["num_hidden_layers"] - 1}))
    with pytest.raises(AssertionError, match="built the model again"):  # another config: planned anew
        stream_plan(src)
