"""steering.weights.export.to_peft: a PEFT LoRA adapter that reproduces Ablation.bake on the original model."""

import copy
import json
import warnings
from functools import lru_cache

import pytest
import torch

from steering.arch import ArchitectureError
from steering.edits import Ablation, Addition, load_edit
from steering.weights.export import PEFT_PREFIX, lora_config, to_peft
from steering.model import Model
from steering.testing import FAMILIES, tiny_model
from steering.vectors import SteeringVector

peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

POST_NORM = ("gemma2", "gemma3", "olmo2")
BAKEABLE = tuple(f for f in FAMILIES if f not in POST_NORM)
PROMPTS = ["How do I bake bread?", "Write a poem about the sea, please.", "Explain photosynthesis to a child."]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is much faster than two on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@lru_cache(maxsize=None)
def model(family):
    return tiny_model(family)


def ablation(m, k, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return Ablation(torch.randn(k, m.d_model, generator=g), **kw)


def logits(hf, m):
    with torch.no_grad():
        return hf(**m.encode(m.format(PROMPTS)), use_cache=False).logits


def load_adapter(m, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(m.hf), str(path))


def test_families_partition():
    assert {f for f in FAMILIES if model(f).map.spec.post_norm} == set(POST_NORM)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("family", BAKEABLE)
def test_adapter_reproduces_bake(family, k, tmp_path):
    m = model(family)
    edit = ablation(m, k, seed=k, meta={"direction": "refusal"})
    before = {n: p.detach().clone() for n, p in m.hf.named_parameters()}
    path = to_peft(edit, m, tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp folder left beside it
    assert all(torch.equal(p, before[n]) for n, p in m.hf.named_parameters())  # the model is untouched

    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["r"] == k and cfg["lora_alpha"] == k and cfg["use_rslora"] is False and cfg["peft_type"] == "LORA"
    tensors = load_file(str(path / "adapter_model.safetensors"))
    for key, t in tensors.items():
        if key.endswith(("lora_A.weight", "lora_embedding_A")):  # [r, in], or [E·r, in] for fused experts
            blocks = t.double().reshape(-1, k, t.shape[-1])
            assert all(torch.linalg.matrix_rank(b) == k for b in blocks), key
        if key.endswith(("lora_B.weight", "lora_embedding_B")):  # [d_model, r], or [d_model, r·E]
            assert t.shape[0] == m.d_model and torch.linalg.matrix_rank(t.double()) == k, key

    baked = edit.bake(m)
    pm = load_adapter(m, path)
    # every tensor of the file was loaded into the model, and PEFT would write the same keys
    state = peft.get_peft_model_state_dict(pm, save_embedding_layers=False)
    assert set(state) == set(tensors)
    assert all(torch.equal(state[key].float(), t.float()) for key, t in tensors.items())
    # exactly the edited modules are wrapped
    wrapped = {n.removeprefix(PEFT_PREFIX) for n, mod in pm.named_modules()
               if isinstance(mod, peft.tuners.tuners_utils.BaseTunerLayer)}
    _, pieces = lora_config(edit, m)
    assert wrapped == {p.module for p in pieces if p.kind != "full"}

    want, got, orig = logits(baked.hf, m), logits(pm, m), logits(m.hf, m)
    assert (orig - want).abs().max() > 1e-3  # the edit does something
    assert (got - want).abs().max() <= 1e-4


@pytest.mark.parametrize("family", BAKEABLE)
def test_factors_are_bakes_weight_change(family):
    """Each piece's ΔW (in the parameter's own layout) is what bake does to that parameter; so is each bias."""
    m = model(family)
    edit = ablation(m, 2, seed=7)
    baked = edit.bake(m)
    old = dict(m.hf.named_parameters(remove_duplicate=False))
    new = dict(baked.hf.named_parameters(remove_duplicate=False))
    deltas = edit.weight_deltas(m) if family not in ("mixtral", "qwen3_moe") else {}
    by_param = {id(old[n]): b.double() @ a.double() for n, (b, a) in deltas.items()}
    _, pieces = lora_config(edit, m)
    for p in pieces:
        t = {key.rsplit(".", 2)[-2] if key.endswith(".weight") else key.rsplit(".", 1)[-1]: v.double()
             for key, v in p.tensors.items()}
        name = f"{p.module}.{p.param}"
        true = new[name].double() - old[name].double()
        if p.kind == "full":
            assert torch.equal(p.tensors[f"{p.module}.weight"], new[name])
            continue
        if p.kind == "linear":
            dw = t["lora_B"] @ t["lora_A"]
        elif p.kind in ("conv1d",):
            dw = (t["lora_B"] @ t["lora_A"]).T
        elif p.kind == "embedding":
            dw = (t["lora_embedding_B"] @ t["lora_embedding_A"]).T
        else:  # experts: A [E·k, in] read as [E, k, in]; B [d, k·E] read as [d, k, E]
            n_exp = true.shape[0]
            a = t["lora_A"].reshape(n_exp, -1, t["lora_A"].shape[-1])
            b = t["lora_B"].reshape(t["lora_B"].shape[0], -1, n_exp)
            dw = torch.einsum("ore,eri->eoi", b, a)
        assert (dw - true).abs().max() < 1e-5, name
        if id(old[name]) in by_param:  # agrees with Ablation.weight_deltas, matched by parameter identity
            assert (by_param[id(old[name])] - dw).abs().max() < 1e-5, name
        bias_key = f"{p.module}.base_layer.bias"
        if bias_key in p.tensors:
            assert torch.equal(p.tensors[bias_key], new[f"{p.module}.bias"])
            assert not torch.equal(p.tensors[bias_key], old[f"{p.module}.bias"])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_auto_peft_model_loads_base_and_adapter(family, tmp_path, monkeypatch):
    """adapter_config.json says task_type CAUSAL_LM and names the base model as it was given to
    steering.load (here a relative folder), so AutoPeftModelForCausalLM loads base and adapter in one call."""
    from peft import AutoPeftModelForCausalLM, PeftModelForCausalLM

    import steering as st

    monkeypatch.chdir(tmp_path)
    tiny = model(family)
    tiny.hf.save_pretrained("base")
    tiny.tokenizer.save_pretrained("base")
    m = st.load("base")
    edit = ablation(m, 2, seed=3)
    path = to_peft(edit, m, "adapter")
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM"
    assert cfg["base_model_name_or_path"] == "base"  # what was passed, not resolved to an absolute path
    assert json.loads((path / "steering_provenance.json").read_text())["base_model"] == "base"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = AutoPeftModelForCausalLM.from_pretrained(str(path)).eval()
    assert isinstance(pm, PeftModelForCausalLM)
    with edit.hooks(m):
        hooked = logits(m.hf, m)
    want, got = logits(edit.bake(m).hf, m), logits(pm, m)
    assert (logits(m.hf, m) - want).abs().max() > 1e-3  # the edit does something
    assert (got - want).abs().max() <= 1e-4 and (got - hooked).abs().max() <= 1e-4


def test_base_model_name_can_be_given(tmp_path):
    """base_model= records the hub name of a model loaded from elsewhere (config, provenance, model card)."""
    m = model("qwen2")
    path = to_peft(ablation(m, 1), m, tmp_path / "a", base_model="Qwen/Qwen2.5-0.5B-Instruct")
    assert json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert json.loads((path / "steering_provenance.json").read_text())["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert "base_model: Qwen/Qwen2.5-0.5B-Instruct" in (path / "README.md").read_text()
    assert peft.PeftConfig.from_pretrained(str(path)).task_type == "CAUSAL_LM"


def test_biases_travel_in_the_adapter(tmp_path):
    m = model("gpt2")
    edit = ablation(m, 1)
    path = to_peft(edit, m, tmp_path / "a")
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["bias"] == "lora_only" and cfg["fan_in_fan_out"] is True
    assert any(key.endswith(".base_layer.bias") for key in load_file(str(path / "adapter_model.safetensors")))
    assert json.loads((path / "steering_provenance.json").read_text())["biases"] == 2 * m.n_layers


def test_tied_head_unchanged_and_untie_then_merge(tmp_path):
    m = model("gpt2")
    assert m.hf.lm_head.weight is m.hf.transformer.wte.weight
    edit = ablation(m, 2)
    path = to_peft(edit, m, tmp_path / "a")
    pm = load_adapter(m, path)
    assert torch.equal(pm.base_model.model.lm_head.weight, m.hf.lm_head.weight)
    want = logits(edit.bake(m).hf, m)
    hf = copy.deepcopy(m.hf)  # the recipe in the README: untie, then merge
    hf.lm_head.weight = torch.nn.Parameter(hf.transformer.wte.weight.detach().clone())
    hf.config.tie_word_embeddings = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = peft.PeftModel.from_pretrained(hf, str(path)).merge_and_unload()
    assert (logits(merged, m) - want).abs().max() <= 1e-4


def test_provenance(tmp_path):
    m = model("llama")
    edit = ablation(m, 3, meta={"direction": "refusal", "layer": "2"})
    path = to_peft(edit, m, tmp_path / "a")
    prov = json.loads((path / "steering_provenance.json").read_text())
    assert prov["rank"] == 3 and prov["meta"] == {"direction": "refusal", "layer": "2"} and prov["kind"] == "ablation"
    assert "steering" not in json.loads((path / "adapter_config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # adapter_config.json has no key PEFT does not know
        peft.LoraConfig.from_pretrained(str(path))
    assert torch.equal(load_edit(path / "steering_edit.safetensors").basis, edit.basis)
    assert "Provenance" in (path / "README.md").read_text()


@pytest.mark.parametrize("family", POST_NORM)
def test_post_norm_refused_like_bake(family, tmp_path):
    m = model(family)
    edit = ablation(m, 1)
    with pytest.raises(ArchitectureError) as baked:
        edit.bake(m)
    with pytest.raises(ArchitectureError) as exported:
        to_peft(edit, m, tmp_path / "a")
    assert str(exported.value) == str(baked.value)
    assert list(tmp_path.iterdir()) == []


def test_other_refusals(tmp_path):
    m = model("llama")
    with pytest.raises(ValueError, match="only the full ablation"):
        to_peft(ablation(m, 1, layers=(0,)), m, tmp_path / "a")
    with pytest.raises(ValueError, match="d_model"):
        to_peft(Ablation(torch.randn(1, m.d_model + 1)), m, tmp_path / "a")
    with pytest.raises(TypeError, match="Ablation"):
        to_peft(Addition(SteeringVector({1: torch.randn(m.d_model)})), m, tmp_path / "a")
    wrong = Model(model("gpt2").hf, model("gpt2").tokenizer, arch={"attn_weights": [["attn.c_proj", "out_in"]]})
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_proj\.weight"):
        to_peft(ablation(wrong, 1), wrong, tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused_and_overwrite(tmp_path):
    m = model("qwen2")
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        to_peft(ablation(m, 1), m, out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    to_peft(ablation(m, 1), m, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    m = model("llama")
    with pytest.raises(OSError, match="disk full"):
        to_peft(ablation(m, 1), m, tmp_path / "a")
    assert list(tmp_path.iterdir()) == []
