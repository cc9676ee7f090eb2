"""`steering task-vector`, `steering hdr` and `steering run RECIPE.yaml` on tiny Hugging Face folders."""

import json

import pytest
import torch

import steering as st
from steering.weights.bake import read_provenance
from steering.cli import main
from steering.edits import Ablation
from steering.recipe import Recipe, run
from steering.weights.taskvec import TaskVector
from steering.weights import Checkpoint

TEXTS = ["How do I bake bread?", "Hi"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, seed in (("base", 0), ("ft", 1), ("target", 2)):
        m = st.testing.tiny_model("llama", seed=seed)
        m.hf.save_pretrained(root / name, max_shard_size="40KB")
        m.tokenizer.save_pretrained(root / name)
        out[name] = root / name
    return out


def state(folder):
    ck = Checkpoint(folder)
    return {n: ck.get(n) for n in ck.names}


def test_cli_task_vector_then_hdr(folders, tmp_path, capsys):
    tau_file = tmp_path / "tau.safetensors"
    assert main(["task-vector", str(folders["base"]), str(folders["ft"]), "--out", str(tau_file)]) == 0
    assert main(["hdr", str(folders["target"]), "--harm-vector", str(tau_file), "--scale", "2", "--top-k", "0.1",
                 "--out", str(tmp_path / "safe")]) == 0
    assert "HDR (scale 2, top 0.1)" in capsys.readouterr().out
    b, f, t, got = state(folders["base"]), state(folders["ft"]), state(folders["target"]), state(tmp_path / "safe")
    trimmed = TaskVector.between(folders["base"], folders["ft"]).top_k(0.1)
    changed = 0
    for n in t:
        want = (t[n].float() - 2.0 * trimmed.get(n)).to(t[n].dtype)
        assert torch.equal(got[n], want), n
        changed += int((got[n] != t[n]).sum())
    total = sum(x.numel() for x in t.values())
    assert 0.09 * total <= changed <= 0.1 * total + 1
    assert not torch.equal(f["model.norm.weight"], b["model.norm.weight"])  # norms take part by default
    st.load(tmp_path / "safe").forward(TEXTS)  # loads and runs


def test_cli_errors_are_one_line(folders, tmp_path, capsys):
    assert main(["hdr", str(folders["target"]), "--harm-vector", str(tmp_path / "nope.safetensors"),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope.safetensors" in err
    assert main(["task-vector", str(folders["base"]), str(folders["ft"]), "--out", str(folders["base"] / "t.safetensors")]) == 2
    assert "inside the input" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (folders["base"] / "t.safetensors").exists()


def test_recipe_composes_task_vectors_hdr_and_a_bake(folders, tmp_path):
    m = st.load(folders["target"])
    edit = Ablation(torch.randn(1, m.d_model))
    edit.save(tmp_path / "dir.safetensors")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
model: {folders['target']}
out: {tmp_path / 'out'}
steps:
  - task_arithmetic:
      vectors: [{{base: {folders['base']}, finetuned: {folders['ft']}, include: 'layers\\.1\\.'}}]
      scale: 0.5
  - hdr: {{harm: {{base: {folders['base']}, finetuned: {folders['ft']}}}, scale: 1.5, top_k: 0.2}}
  - bake: {{edit: {tmp_path / 'dir.safetensors'}}}
""")
    assert main(["run", str(recipe)]) == 0
    tau = TaskVector.between(folders["base"], folders["ft"])
    want = st.load(folders["target"])
    params = dict(want.hf.named_parameters())
    with torch.no_grad():
        delta = 0.5 * TaskVector.between(folders["base"], folders["ft"], include=r"layers\.1\.") + (-1.5) * tau.top_k(0.2)
        for n in delta.names:
            params[n].copy_((params[n].float() + delta.get(n)).to(params[n].dtype))
    want = edit.bake(want)
    got = st.load(tmp_path / "out")
    texts = got.format(TEXTS)
    torch.testing.assert_close(got.forward(texts), want.forward(texts), rtol=0, atol=1e-5)
    prov = read_provenance(tmp_path / "out")
    assert prov["method"] == "recipe" and prov["recipe"]["steps"][1]["hdr"]["scale"] == 1.5


def test_recipe_without_bakes_streams(folders, tmp_path):
    r = Recipe(model=str(folders["target"]), out=str(tmp_path / "o"),
               steps=[{"ties": {"vectors": [{"base": str(folders["base"]), "finetuned": str(folders["ft"])},
                                            {"base": str(folders["base"]), "finetuned": str(folders["target"])}],
                                "top_k": 0.3, "scale": 0.8}}])
    out = run(r, progress=False)
    assert json.loads(Checkpoint(out).metadata["steering"])["method"] == "recipe"
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in folders["target"].glob("*.safetensors"))


@pytest.mark.parametrize("text, message", [
    ("model: a\nout: b\nsteps:\n  - hdr: {harm: {file: x}, scal: 2}\n", "steps.0.hdr.scal: Extra inputs are not permitted"),
    ("model: a\nout: b\nsteps:\n  - {}\n", "steps.0: Value error, each step is exactly one of"),
    ("model: a\nsteps: []\n", "out: Field required"),
    ("model: [a\n", "not valid YAML"),
    ("model: a\nout: b\nsteps:\n  - task_arithmetic: {vectors: [{base: a}]}\n", "either {file: FILE} or {base: DIR, finetuned: DIR}"),
])
def test_bad_recipes_are_named(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        Recipe.from_yaml(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_shipped_recipes_parse():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[1] / "experiments" / "recipes").glob("*.yaml"))
    assert recipes
    from steering.recipe import EvalRecipe, load_recipe

    kinds = set()
    for path in recipes:
        r = load_recipe(path)
        kinds.add(type(r))
        assert r.model.startswith("organism:") and (r.settings if isinstance(r, EvalRecipe) else r.steps)
    assert kinds == {Recipe, EvalRecipe}


def test_evaluation_recipe_runs_settings_side_by_side(folders, tmp_path):
    from steering.edits import Addition
    from steering.vectors import SteeringVector

    m = st.load(folders["target"])
    Addition(SteeringVector({1: torch.randn(m.d_model)}), 3.0).save(tmp_path / "add.safetensors")
    weights = tmp_path / "w.yaml"
    weights.write_text(f"model: {folders['target']}\nout: {tmp_path / 'hdr'}\nsteps:\n"
                       f"  - hdr: {{harm: {{base: {folders['base']}, finetuned: {folders['ft']}}}, scale: 0.5, top_k: 0.5}}\n")
    recipe = tmp_path / "e.yaml"
    recipe.write_text(f"""
model: {folders['target']}
out: {tmp_path / 'report'}
limit: 3
n_utility: 3
max_new_tokens: 3
settings:
  - name: plain
  - name: added
    edits: [{{file: {tmp_path / 'add.safetensors'}}}]
  - name: icv
    edits: [{{icv: {{n: 4, beta: 0.5}}}}]
  - name: hdr
    model: {{recipe: {weights}}}
  - name: safeinfer
    safeinfer: {{unsafe: {folders['base']}, amplify_layer: 1, amplify_scale: 2}}
""")
    assert main(["run", str(recipe)]) == 0
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["rows"]
    assert list(rows) == ["plain", "added", "icv", "hdr", "safeinfer"]
    assert rows["plain"]["kl"] == pytest.approx(0, abs=1e-6) and rows["added"]["kl"] > 0 and rows["hdr"]["kl"] > 0
    assert (tmp_path / "hdr" / "model.safetensors.index.json").is_file()  # the weight recipe ran first


def test_refusal_ablation_spec_builds_the_affine_form(folders, organisms_llama):
    """`refusal_ablation: {affine: true}` selects with the affine form's scores and returns an
    AffineAblation fitted on the harmless validation prompts; a spec whose filters keep nothing
    names the key."""
    from steering.edits import AffineAblation
    from steering.recipe import EditSpec

    m = st.load(organisms_llama.path("aligned"))
    spec = EditSpec.model_validate({"refusal_ablation": {"n": 16, "n_val": 8, "affine": True}})
    edit = spec.build(m)
    assert isinstance(edit, AffineAblation) and edit.rank == 1 and edit.offsets.abs().sum() > 0
    plain = EditSpec.model_validate({"refusal_ablation": {"n": 16, "n_val": 8, "kl_threshold": 0.5}}).build(m)
    assert type(plain) is Ablation
    with pytest.raises(ValueError, match="refusal_ablation: no candidate passed.*kl_threshold"):
        EditSpec.model_validate({"refusal_ablation": {"n": 4, "n_val": 4, "kl_threshold": -1.0, "affine": True}}).build(
            st.load(folders["target"]))


def test_a_weight_recipe_output_is_reused_only_while_current(folders, tmp_path):
    """An evaluation setting `model: {recipe: ...}` reuses the weight recipe's output only if its
    provenance records the same recipe and the same input fingerprints; otherwise it reruns it, or
    (overwrite: false) says which folder is stale."""
    from steering.recipe import ModelSpec, is_current

    def weights(scale, overwrite=True):
        f = tmp_path / "w.yaml"
        f.write_text(f"model: {folders['target']}\nout: {tmp_path / 'hdr'}\noverwrite: {str(overwrite).lower()}\nsteps:\n"
                     f"  - hdr: {{harm: {{base: {folders['base']}, finetuned: {folders['ft']}}}, scale: {scale}, top_k: 0.5}}\n")
        return ModelSpec(recipe=str(f))

    out = weights(0.5).resolve(progress=False)
    first = state(out)
    stamp = (tmp_path / "hdr" / "model.safetensors.index.json").stat().st_mtime_ns
    assert is_current(Recipe.from_yaml(tmp_path / "w.yaml"))
    weights(0.5).resolve(progress=False)  # current: reused, not rewritten
    assert (tmp_path / "hdr" / "model.safetensors.index.json").stat().st_mtime_ns == stamp
    weights(1.0).resolve(progress=False)  # another λ: rerun
    assert any(not torch.equal(first[n], t) for n, t in state(out).items())
    with pytest.raises(FileExistsError, match="hdr: holds an output of .*w.yaml"):
        weights(2.0, overwrite=False).resolve(progress=False)
