"""Bad input, tried as a hostile new user would, against every command (tiny models, no organism).

Every case asserts the exit status, that the error is one line naming the input or option, and
that every input is byte-identical afterwards (nothing lost, nothing half-written)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import steering as st
from steering.cli import main
from steering.edits import Ablation, Addition, load_edit
from steering.vectors import SteeringVector


# --- the inputs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny llama folder, a fine-tune of it, edits, a task vector, candidates and prompt files."""
    root = tmp_path_factory.mktemp("hostile")
    m = st.testing.tiny_model("llama")
    model = root / "model"
    m.hf.save_pretrained(model)
    m.tokenizer.save_pretrained(model)
    ft = root / "finetuned"
    torch.manual_seed(1)
    with torch.no_grad():
        for p in m.hf.parameters():
            p.add_(0.01 * torch.randn_like(p))
    m.hf.save_pretrained(ft)
    m.tokenizer.save_pretrained(ft)
    d = m.d_model
    edits = root / "edits"
    edits.mkdir()
    Ablation(torch.randn(d)).save(edits / "ablate.safetensors")
    Addition(SteeringVector({1: torch.randn(d)}, "resid_pre"), 1.0).save(edits / "add.safetensors")
    Addition(SteeringVector({1: torch.randn(d + 3)}, "resid_pre"), 1.0).save(edits / "add_wrong_d.safetensors")
    # a NaN edit written behind the library's back (the constructors refuse NaN)
    good = load_file(str(edits / "ablate.safetensors"))
    meta = _meta(edits / "ablate.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in good.items()}, str(edits / "nan_ablate.safetensors"), metadata=meta)
    add = load_file(str(edits / "add.safetensors"))
    save_file({k: v * float("inf") for k, v in add.items()}, str(edits / "inf_add.safetensors"),
              metadata=_meta(edits / "add.safetensors"))
    save_file(good, str(edits / "no_kind.safetensors"), metadata={k: v for k, v in meta.items() if k != "kind"})
    prompts = root / "prompts.txt"
    prompts.write_text("How do I bake bread?\nWrite a poem about the sea.\nHi\n")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait?\n".encode("latin-1"))
    (root / "latin1.yaml").write_bytes("model: caf\xe9\n".encode("latin-1"))
    assert main(["task-vector", str(model), str(ft), "--out", str(root / "tau.safetensors")]) == 0
    tau = load_file(str(root / "tau.safetensors"))
    save_file(tau, str(root / "tau_badmeta.safetensors"), metadata={"format": "steering.task_vector", "steering": "[1, 2"})
    assert main(["extract", str(model), "--harmful", str(prompts), "--harmless", str(prompts), "--limit", "3",
                 "--out", str(root / "cands.safetensors")]) == 0
    return root


def _meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def _digest(root: Path) -> dict[str, str]:
    """Every file under root (symlinks followed), by content."""
    out = {}
    for dirpath, _, files in os.walk(root, followlinks=True):
        for f in files:
            p = Path(dirpath) / f
            if p.exists():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _fails(capsys, argv, *names, code=2):
    """Run the CLI; it must exit with ``code`` (``"argparse"``: argparse's exit 2) and end on one
    error line naming each of ``names``."""
    argv = [str(a) for a in argv]
    if code == "argparse":
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    else:
        assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error printed"
    last = err[-1]
    assert "error:" in last, last
    for name in names:
        assert str(name) in last, (name, last)
    assert len([line for line in err if "error:" in line]) == 1
    assert "Traceback" not in "\n".join(err)
    return last


@pytest.fixture
def unchanged(inputs):
    """Asserts, after the test, that no file of the inputs changed."""
    before = _digest(inputs)
    yield
    assert _digest(inputs) == before


# --- data lost: outputs over, inside or around an input ---------------------------------------------
@pytest.mark.parametrize("case", ["record_over_weights", "record_over_prompts", "extract_over_weights",
                                  "record_into_model", "bake_out_holds_edit", "bake_over_model", "select_over_candidates",
                                  "eval_into_model", "hdr_over_vector", "task_vector_over_base"])
def test_outputs_never_touch_inputs(inputs, unchanged, capsys, case):
    m, p, e = inputs / "model", inputs / "prompts.txt", inputs / "edits"
    argv, name = {
        "record_over_weights": (["record", m, "--prompts", p, "--out", m / "model.safetensors"], "model.safetensors"),
        "record_over_prompts": (["record", m, "--prompts", p, "--out", p], "prompts.txt"),
        "extract_over_weights": (["extract", m, "--harmful", p, "--harmless", p, "--out", m / "model.safetensors"], "model"),
        "record_into_model": (["record", m, "--prompts", p, "--out", m / "new.safetensors"], "inside the input"),
        "bake_out_holds_edit": (["bake", m, "--edit", e / "ablate.safetensors", "--out", e, "--overwrite"], "ablate.safetensors"),
        "bake_over_model": (["bake", m, "--edit", e / "ablate.safetensors", "--out", m, "--overwrite", "--in-memory"], "model"),
        "select_over_candidates": (["select", m, inputs / "cands.safetensors", "--harmful-val", p, "--harmless-val", p,
                                    "--out", inputs / "cands.safetensors"], "cands.safetensors"),
        "eval_into_model": (["eval", m, "--out", m, "--overwrite"], "model"),
        "hdr_over_vector": (["hdr", inputs / "finetuned", "--harm-vector", inputs / "tau.safetensors",
                             "--out", inputs / "tau.safetensors", "--overwrite"], "tau.safetensors"),
        "task_vector_over_base": (["task-vector", m, inputs / "finetuned", "--out", m, "--overwrite"], "model"),
    }[case]
    _fails(capsys, argv, name)


def test_hf_cache_layout_is_resolved(tmp_path, inputs, capsys):
    """A snapshot folder of links into ../../blobs: --out at the blobs folder is refused."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for f in (inputs / "model").iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blobs / f.name, snap))
    before = _digest(blobs)
    _fails(capsys, ["bake", snap, "--edit", inputs / "edits" / "ablate.safetensors", "--out", blobs, "--overwrite"], "blobs")
    assert _digest(blobs) == before and all((snap / f).exists() for f in os.listdir(snap))


def test_recipe_whose_output_holds_its_edit(tmp_path, inputs, capsys):
    work = tmp_path / "w"
    work.mkdir()
    edit = work / "edit.safetensors"
    edit.write_bytes((inputs / "edits" / "ablate.safetensors").read_bytes())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {inputs / 'model'}\nout: {work}\noverwrite: true\nsteps:\n  - bake: {{edit: {edit}}}\n")
    before = _digest(work)
    _fails(capsys, ["run", recipe], "edit.safetensors")
    assert _digest(work) == before
    recipe.write_text(f"model: {inputs / 'model'}\nout: {tmp_path}\noverwrite: true\nsteps:\n  - bake: {{edit: {edit}}}\n")
    _fails(capsys, ["run", recipe], "r.yaml")  # the recipe's own folder
    assert recipe.exists() and _digest(work) == before


# --- bad values accepted before ------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["bake_nan_ablation", "generate_inf_addition", "edit_without_kind", "bake_wrong_d",
                                  "record_layer_99", "hdr_bad_metadata", "info_missing_relative", "info_missing_nested",
                                  "info_organism_nonsense", "latin1_prompts", "latin1_recipe", "record_bad_layers"])
def test_bad_inputs_are_one_line_errors(inputs, unchanged, capsys, tmp_path, case, monkeypatch):
    m, e = inputs / "model", inputs / "edits"
    monkeypatch.setenv("STEERING_CACHE", str(tmp_path / "cache"))
    argv, names = {
        "bake_nan_ablation": (["bake", m, "--edit", e / "nan_ablate.safetensors", "--out", tmp_path / "o"], ["nan_ablate", "NaN"]),
        "generate_inf_addition": (["generate", m, "--edit", e / "inf_add.safetensors", "--prompt", "hi"], ["inf_add", "NaN or infinite"]),
        "edit_without_kind": (["bake", m, "--edit", e / "no_kind.safetensors", "--out", tmp_path / "o"], ["no_kind", "kind"]),
        "bake_wrong_d": (["bake", m, "--edit", e / "add_wrong_d.safetensors", "--out", tmp_path / "o"], ["d_model"]),
        "record_layer_99": (["record", m, "--prompts", inputs / "prompts.txt", "--layers", "99", "--out", tmp_path / "r.st"],
                            ["layer 99"]),
        "record_bad_layers": (["record", m, "--prompts", inputs / "prompts.txt", "--layers", "1,x", "--out", tmp_path / "r.st"],
                              ["--layers"]),
        "hdr_bad_metadata": (["hdr", inputs / "finetuned", "--harm-vector", inputs / "tau_badmeta.safetensors",
                              "--out", tmp_path / "o"], ["tau_badmeta", "metadata"]),
        "info_missing_relative": (["info", "./no/such/model"], ["no/such/model"]),
        "info_missing_nested": (["info", "runs/nothing/here"], ["runs/nothing/here", "no such folder"]),
        "info_organism_nonsense": (["info", "organism:nonsense"], ["organism:nonsense"]),
        "latin1_prompts": (["record", m, "--prompts", inputs / "latin1.txt", "--out", tmp_path / "r.st"], ["latin1.txt", "UTF-8"]),
        "latin1_recipe": (["run", inputs / "latin1.yaml"], ["latin1.yaml", "UTF-8"]),
    }[case]
    _fails(capsys, argv, *names)
    assert not (tmp_path / "o").exists() and not (tmp_path / "r.st").exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))  # no build began


@pytest.mark.parametrize("argv, option", [
    (["hdr", "F", "--harm-vector", "T", "--out", "O", "--scale", "nan"], "--scale"),
    (["hdr", "F", "--harm-vector", "T", "--out", "O", "--scale", "inf"], "--scale"),
    (["hdr", "F", "--harm-vector", "T", "--out", "O", "--top-k", "1.5"], "--top-k"),
    (["task-vector", "B", "F", "--out", "O", "--top-k", "0"], "--top-k"),
    (["generate", "M", "--prompt", "hi", "--safeinfer", "--gamma", "nan"], "--gamma"),
    (["generate", "M", "--prompt", "hi", "--safeinfer", "--amplify-scale", "nan"], "--amplify-scale"),
    (["record", "M", "--prompts", "P", "--out", "O", "--batch-size", "0"], "--batch-size"),
    (["extract", "M", "--out", "O", "--batch-size", "-2"], "--batch-size"),
    (["eval", "M", "--out", "O", "--limit", "0"], "--limit"),
    (["eval", "M", "--out", "O", "--n-utility", "0"], "--n-utility"),
    (["generate", "M", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["select", "M", "C", "--out", "O", "--kl-threshold", "nan"], "--kl-threshold"),
])
def test_bad_numbers_are_refused_naming_the_option(capsys, argv, option):
    last = _fails(capsys, argv, option, code="argparse")
    assert "error:" in last


def test_info_on_broken_weights(tmp_path, inputs, capsys):
    """Truncated, corrupt-header, empty, wrong-shape and missing-tensor checkpoints: one line each."""
    src = inputs / "model"
    weights = (src / "model.safetensors").read_bytes()
    tensors = load_file(str(src / "model.safetensors"))
    key = sorted(k for k in tensors if "layers.1.mlp.down_proj" in k)[0]

    def folder(name, data=None, tensors_=None):
        f = tmp_path / name
        f.mkdir()
        for side in src.iterdir():
            if side.suffix != ".safetensors":
                (f / side.name).write_bytes(side.read_bytes())
        if tensors_ is not None:
            save_file(tensors_, str(f / "model.safetensors"), metadata={"format": "pt"})
        else:
            (f / "model.safetensors").write_bytes(data)
        return f

    cases = {
        "truncated": (folder("truncated", weights[: len(weights) // 2]), "truncated"),
        "corrupt": (folder("corrupt", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"), "corrupt"),
        "empty": (folder("empty", b""), "model.safetensors"),
        "shape": (folder("shape", tensors_={**tensors, key: torch.zeros(3, 3)}), key),
        "missing": (folder("missing", tensors_={k: v for k, v in tensors.items() if k != key}), key),
    }
    for name, (path, word) in cases.items():
        before = _digest(path)
        _fails(capsys, ["info", path], name, word)
        assert _digest(path) == before
        with pytest.raises((ValueError, OSError)):
            st.load(path)  # the Python API refuses the same: never a model with random weights


def test_eval_out_onto_a_users_folder_needs_overwrite(tmp_path, inputs, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    _fails(capsys, ["eval", inputs / "model", "--out", mine], "mine", "--overwrite")
    assert (mine / "notes.txt").read_text() == "my notes" and sorted(os.listdir(mine)) == ["notes.txt"]


def test_organism_build_refuses_a_full_folder_before_building(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STEERING_CACHE", str(tmp_path / "cache"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    _fails(capsys, ["organism", "build", "--out", full], "full", "--overwrite")
    _fails(capsys, ["organism", "build", "--out", tmp_path / "new", "--arch", "nope"], "nope")
    assert not (tmp_path / "cache").exists() and (full / "keep.txt").read_text() == "x"


def test_failed_select_writes_nothing(tmp_path, inputs, unchanged, capsys):
    p = inputs / "prompts.txt"
    out = tmp_path / "sel" / "edit.safetensors"
    _fails(capsys, ["select", inputs / "model", inputs / "cands.safetensors", "--harmful-val", p, "--harmless-val", p,
                    "--kl-threshold", "0", "--out", out], "--kl-threshold")
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_task_vector_names_a_tensor_whose_dtype_differs(tmp_path, inputs, capsys):
    ft = tmp_path / "ft"
    ft.mkdir()
    for side in (inputs / "finetuned").iterdir():
        if side.suffix != ".safetensors":
            (ft / side.name).write_bytes(side.read_bytes())
    t = load_file(str(inputs / "finetuned" / "model.safetensors"))
    key = sorted(t)[0]
    t[key] = t[key].to(torch.float16)
    save_file(t, str(ft / "model.safetensors"), metadata={"format": "pt"})
    _fails(capsys, ["task-vector", inputs / "model", ft, "--out", tmp_path / "tau.safetensors"], key, "dtype")
    assert not (tmp_path / "tau.safetensors").exists()


# --- outputs: remote code, stale temporaries, atomic replacement, interruptions ---------------------------
def test_bake_drops_remote_code_unless_asked(tmp_path, inputs):
    src = tmp_path / "remote"
    src.mkdir()
    for f in (inputs / "model").iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "configuration_evil.py").write_text("raise SystemExit('ran remote code')\n")
    before = _digest(src)
    out = tmp_path / "baked"
    assert main(["bake", str(src), "--edit", str(inputs / "edits" / "ablate.safetensors"), "--out", str(out)]) == 0
    assert not (out / "configuration_evil.py").exists()
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert _digest(src) == before
    st.load(out)  # loads with no remote code


def test_stale_temporaries_are_cleaned_and_overwrite_keeps_a_whole_output(tmp_path, inputs):
    out = tmp_path / "baked"
    edit = str(inputs / "edits" / "ablate.safetensors")
    assert main(["bake", str(inputs / "model"), "--edit", edit, "--out", str(out)]) == 0
    first = _digest(out)
    dead = 2**22 + 12345  # above the kernel's default pid_max: no such process
    (tmp_path / f".baked.tmp-{dead}-x").mkdir()
    (tmp_path / f".baked.tmp-{dead}-x" / "half.safetensors").write_bytes(b"junk")
    (tmp_path / f".baked.tmp-{os.getpid()}-live").mkdir()  # a live process's temporary is left alone
    assert main(["bake", str(inputs / "model"), "--edit", edit, "--out", str(out), "--overwrite"]) == 0
    assert _digest(out) == first
    assert sorted(os.listdir(tmp_path)) == [f".baked.tmp-{os.getpid()}-live", "baked"]


def test_a_run_killed_mid_swap_gives_the_old_output_back(tmp_path):
    from steering.io import atomic_folder

    out = tmp_path / "o"
    with atomic_folder(out) as t:
        (t / "a").write_text("old")
    dead = 2**22 + 54321
    os.rename(out, tmp_path / f".o.old-{dead}-x")  # as the aside-then-rename path leaves it when killed between
    with atomic_folder(out) as t:
        assert (out / "a").read_text() == "old"  # put back before the new run begins
        (t / "a").write_text("new")
    assert (out / "a").read_text() == "new" and os.listdir(tmp_path) == ["o"]


_KILL = textwrap.dedent("""
    import os, sys
    import steering.weights as w
    n = int(sys.argv[1]); seen = [0]
    def killing(real):
        def write(self, *args):
            seen[0] += 1
            if seen[0] > n:
                os._exit(9)  # as kill -9: no clean-up runs
            return real(self, *args)
        return write
    w.ShardWriter.write = killing(w.ShardWriter.write)  # whole tensors
    w.ShardWriter.write_piece = killing(w.ShardWriter.write_piece)  # streamed pieces
    from steering.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize("after", [0, 5, 20])
def test_killed_hdr_leaves_the_old_output_or_none(tmp_path, inputs, after):
    """kill -9 part-way through: no output (or the old one, byte-identical); the next run cleans up."""
    out = tmp_path / "hdr"
    args = ["hdr", str(inputs / "finetuned"), "--harm-vector", str(inputs / "tau.safetensors"), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _KILL, str(after), *args], env=env, capture_output=True)
    assert r.returncode == 9
    assert not out.exists()
    assert main(args) == 0  # the next run into the same place works and removes the dead temporary
    done = _digest(out)
    assert os.listdir(tmp_path) == ["hdr"]
    r = subprocess.run([sys.executable, "-c", _KILL, str(after), *args, "--overwrite"], env=env, capture_output=True)
    assert r.returncode == 9
    assert _digest(out) == done  # the old output is whole


def test_ctrl_c_is_one_line_and_leaves_nothing(tmp_path, inputs, capsys, monkeypatch):
    import steering.weights as w

    def interrupt(self, piece):
        raise KeyboardInterrupt

    monkeypatch.setattr(w.ShardWriter, "write_piece", interrupt)  # what a streamed edit writes with
    out = tmp_path / "hdr"
    got = main(["hdr", str(inputs / "finetuned"), "--harm-vector", str(inputs / "tau.safetensors"), "--out", str(out)])
    assert got == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("steering hdr: interrupted") and "Traceback" not in "\n".join(err)
    assert os.listdir(tmp_path) == []


def test_the_writer_reports_the_first_error(tmp_path, inputs, capsys, monkeypatch):
    import steering.weights as w

    real = w.ShardWriter.write_piece
    count = [0]

    def fail_third(self, piece):
        count[0] += 1
        if count[0] == 3:
            raise OSError(28, "No space left on device")
        return real(self, piece)

    monkeypatch.setattr(w.ShardWriter, "write_piece", fail_third)  # what a streamed edit writes with
    last = _fails(capsys, ["hdr", inputs / "finetuned", "--harm-vector", inputs / "tau.safetensors",
                           "--out", tmp_path / "hdr"], "No space left")
    assert "not written" not in last and os.listdir(tmp_path) == []


def _fallocate_failing_with(err, calls):
    import ctypes

    def fallocate(fd, mode, offset, size):
        calls.append(size)
        ctypes.set_errno(err)
        return -1

    return lambda name, argtypes: fallocate if name == "fallocate" else None


def test_a_disk_too_small_is_refused_before_any_write(tmp_path, inputs, unchanged, capsys, monkeypatch):
    import errno

    import steering.io as sio
    import steering.weights as w

    calls, writes = [], []
    monkeypatch.setattr(sio, "_libc", _fallocate_failing_with(errno.ENOSPC, calls))
    real = w.ShardWriter.write_piece
    monkeypatch.setattr(w.ShardWriter, "write_piece", lambda self, piece: (writes.append(1), real(self, piece)))
    last = _fails(capsys, ["bake", inputs / "model", "--edit", inputs / "edits" / "ablate.safetensors",
                           "--out", tmp_path / "baked"], "model.safetensors", "cannot hold")
    assert calls and calls[0] > (inputs / "model" / "model.safetensors").stat().st_size // 2
    assert writes == [] and os.listdir(tmp_path) == [], last


def test_a_file_system_without_fallocate_still_gets_the_output(tmp_path, inputs, monkeypatch):
    import errno

    import steering.io as sio

    calls = []
    monkeypatch.setattr(sio, "_libc", _fallocate_failing_with(errno.EOPNOTSUPP, calls))
    out = tmp_path / "baked"
    assert main(["bake", str(inputs / "model"), "--edit", str(inputs / "edits" / "ablate.safetensors"),
                 "--out", str(out)]) == 0
    assert calls and load_file(str(out / "model.safetensors"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fallocate(2) is Linux's")
def test_reserve_allocates_the_whole_file(tmp_path):
    from steering.io import reserve

    p = tmp_path / "f"
    with open(p, "wb") as f:
        reserve(f.fileno(), 3 << 20, p)
    assert p.stat().st_size == 3 << 20 and p.stat().st_blocks * 512 >= 3 << 20


def test_nan_ablation_basis_is_refused_by_the_api():
    with pytest.raises(ValueError, match="NaN"):
        Ablation(torch.full((8,), float("nan")))
    with pytest.raises(ValueError, match="scale"):
        Addition(SteeringVector({0: torch.ones(8)}, "resid_pre"), float("nan"))
    with pytest.raises(IndexError, match="layer 4"):
        st.record(st.testing.tiny_model("llama"), ["hi"], layers=[4], progress=False)


def test_loaded_edits_are_checked(inputs):
    with pytest.raises(ValueError, match="nan_ablate.*NaN"):
        load_edit(inputs / "edits" / "nan_ablate.safetensors")


_BUILD = textwrap.dedent("""
    import sys, json
    import torch
    torch.set_num_threads(1)
    from steering import organisms
    tiny = json.loads(sys.argv[2])
    org = organisms.build(cache=sys.argv[1], progress=True, **tiny)
    print("FOLDER", org.root)
""")


def test_two_builds_of_one_recipe_at_once_build_once(tmp_path):
    """The cache's file lock: the second build waits for the first, and both get the same folder."""
    tiny = dict(d_model=16, n_layers=2, d_mlp=32, vocab_size=600, aligned_steps=2, harmful_steps=1, drift_steps=1,
                n_harmless_train=16, batch_size=4, n_eval=4, eval_new_tokens=2, augment_copies=0, n_skill_train=8,
                n_skill_eval=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", _BUILD, str(tmp_path / "cache"), json.dumps(tiny)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    folders = {line for o in outs for line in o.splitlines() if line.startswith("FOLDER")}
    assert len(folders) == 1
    assert sum(o.count("organism drifted") for o in outs) == 1  # built once; the other waited and reused it
    cache = tmp_path / "cache"
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == [Path(folders.pop().split()[1]).name]
