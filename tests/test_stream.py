"""Streamed weight edits: pieces, read-ahead, fingerprints hashed as the bytes are read, HDR's
one-pass exact top-k, and the device / thread options. The bytes out must be the ones the
plain (whole-tensor, radix-select) computation gives."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

import steering.weights.files as files
import steering.weights.taskvec as tv
from steering.cli import main
from steering.testing import save_sharded
from steering.weights import Checkpoint
from steering.weights.taskvec import TaskVector, apply, hdr


def weights(seed: int, *, tied: bool, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A few thousand entries in tensors of several sizes; ``tied``: 16-bit weights whose
    differences take few values (ties at any threshold), else continuous float32."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": (64, 48), "layers.0.w": (48, 40), "layers.0.norm": (48,), "layers.1.w": (40, 48),
              "layers.10.w": (48, 48), "head.weight": (64, 48), "scalar": ()}
    out = {}
    for n, s in shapes.items():
        t = torch.randn(s, generator=g) * 0.02 + torch.randn(s, generator=torch.Generator().manual_seed(99)) * 0.02
        out[n] = t.to(dtype if tied else torch.float32)
    return out


def ckpt(path: Path, seed: int, tied: bool, shards: int = 3) -> Path:
    base = weights(0, tied=tied)
    w = {n: (t.float() + (weights(seed, tied=tied)[n].float() - t.float()) * 0.1).to(t.dtype) if seed else t
         for n, t in base.items()}
    return save_sharded(w, path, shards)


def tensor_bytes(folder: Path) -> dict[str, bytes]:
    ck = Checkpoint(folder)
    return {n: ck.get(n).reshape(-1).view(torch.uint8).numpy().tobytes() for n in ck.names}


@pytest.fixture(params=[False, True], ids=["continuous", "tied"])
def trio(request, tmp_path):
    tied = request.param
    return ckpt(tmp_path / "base", 0, tied), ckpt(tmp_path / "ft", 1, tied), ckpt(tmp_path / "tgt", 2, tied)


@pytest.mark.parametrize("frac", [0.01, 0.1, 0.5, 0.99])
@pytest.mark.parametrize("piece", [None, 37])
def test_one_pass_hdr_writes_what_the_radix_path_writes(trio, tmp_path, monkeypatch, frac, piece):
    base, ft, tgt = trio
    if piece:  # pieces smaller than tensors, ties spanning pieces
        monkeypatch.setattr(files, "PIECE", piece)
    calls = []
    real, real_write = tv._hdr_one_pass, files.write_checkpoint
    monkeypatch.setattr(tv, "_hdr_one_pass", lambda *a, **k: calls.append("one pass") or real(*a, **k))
    monkeypatch.setattr(files, "write_checkpoint", lambda *a, **k: calls.append("write") or real_write(*a, **k))
    patched, real_patch = [], tv._patch
    monkeypatch.setattr(tv, "_patch", lambda f, name, flat, values: patched.append(len(flat)) or real_patch(f, name, flat, values))
    one = hdr(tgt, TaskVector.between(base, ft), tmp_path / "one", top_k=frac)
    assert calls == ["one pass", "write"]  # the bracket held: one write, no second
    assert sum(patched) > 0  # some of the bracket's entries were kept, and written into the shards after the pass
    monkeypatch.setattr(tv, "_FORCE_RADIX", True)
    radix = hdr(tgt, TaskVector.between(base, ft), tmp_path / "radix", top_k=frac)
    assert tensor_bytes(one) == tensor_bytes(radix)
    a, b = (json.loads(Checkpoint(p).metadata["steering"]) for p in (one, radix))
    assert a == b  # the same provenance too


@pytest.mark.parametrize("window", ["too_high", "too_low", "none"])
def test_a_misjudged_bracket_falls_back_to_the_same_bytes(trio, tmp_path, monkeypatch, window):
    base, ft, tgt = trio
    tau = TaskVector.between(base, ft)
    k = tau.top_k(0.1).k_of(tau.numel)
    lo, hi = tv._bracket(tau, k, 10**9)
    wrong = {"too_high": (hi + 1, hi + 2), "too_low": (0, max(0, lo - 1)), "none": None}[window]
    monkeypatch.setattr(tv, "_bracket", lambda *a: wrong)
    calls, real = [], tv._hdr_one_pass

    def one_pass(*a, **k):
        try:
            return real(*a, **k)
        except tv._BracketMissed:
            calls.append("missed")
            raise

    monkeypatch.setattr(tv, "_hdr_one_pass", one_pass)
    out = hdr(tgt, tau, tmp_path / "out", top_k=0.1)
    assert calls == ["missed"]
    monkeypatch.setattr(tv, "_FORCE_RADIX", True)
    assert tensor_bytes(out) == tensor_bytes(hdr(tgt, TaskVector.between(base, ft), tmp_path / "radix", top_k=0.1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft", "out", "radix", "tgt"]  # no temporary left


def test_the_bracket_holds_the_kth_magnitude(tmp_path):
    """On 400k continuous entries the sampled bracket contains the exact threshold and a small
    share of the entries (±8 standard errors of a 4% sample: about 4% expected, and the entries a
    bracket holds are what the one-pass HDR keeps aside)."""
    g = torch.Generator().manual_seed(0)
    base = save_sharded({f"t{i}": torch.randn(20000, generator=g) for i in range(20)}, tmp_path / "b", 2)
    ft = save_sharded({f"t{i}": torch.randn(20000, generator=g) * (1 + i / 10) for i in range(20)}, tmp_path / "f", 2)
    tau = TaskVector.between(base, ft)
    monkeypatch_sample = tv._SAMPLE
    tv._SAMPLE = 2**14  # a sample of 4% of the entries, as a big model's would be
    try:
        top = tau.top_k(0.1)
        k = top.k_of(tau.numel)
        lo, hi = tv._bracket(tau, k, 10**9)
    finally:
        tv._SAMPLE = monkeypatch_sample
    exact = top.threshold().value_bits
    assert lo <= exact <= hi
    mags = torch.cat([tau.get(n).abs().view(torch.int32) for n in tau.names])
    assert int(((mags >= lo) & (mags <= hi)).sum()) < 0.10 * tau.numel


def sha256_of(folder: Path) -> str:
    h = hashlib.sha256()
    for shard in sorted(Checkpoint(folder).files):
        h.update((folder / shard).read_bytes())
    return h.hexdigest()


def test_fingerprints_hashed_while_reading_are_the_files_sha256(trio, tmp_path, monkeypatch):
    base, ft, tgt = trio
    monkeypatch.setattr(files, "_FINGERPRINTS", {})  # nothing known in advance: every hash is computed here
    monkeypatch.setattr(files, "_fingerprint_dir", lambda: tmp_path / "fingerprints")
    monkeypatch.setattr(files, "PIECE", 50)
    out = hdr(tgt, TaskVector.between(base, ft), tmp_path / "out", top_k=0.2)
    raw = [(out / s).read_bytes() for s in Checkpoint(out).files]
    assert all(b"sha256-pending" not in r for r in raw)  # every placeholder filled in
    prov = json.loads(Checkpoint(out).metadata["steering"])
    assert prov["target_sha256"] == sha256_of(tgt)
    assert prov["vector"]["of"]["base_sha256"] == sha256_of(base)
    assert prov["vector"]["of"]["finetuned_sha256"] == sha256_of(ft)
    assert "sha256-pending" not in (out / "README.md").read_text()
    # a vector saved in name order reads its inputs out of disk order: the hash still comes out right
    monkeypatch.setattr(files, "_FINGERPRINTS", {})
    saved = TaskVector.between(base, ft).save(tmp_path / "tau.safetensors")
    meta = json.loads(Checkpoint(saved).metadata["steering"])
    assert meta["base_sha256"] == sha256_of(base) and meta["finetuned_sha256"] == sha256_of(ft)
    assert TaskVector.load(saved).provenance["finetuned_sha256"] == sha256_of(ft)


def test_a_fingerprint_is_remembered_until_a_file_changes(tmp_path, monkeypatch):
    """A digest is kept per file identity and times: the next open of the same files hashes
    nothing (an entry planted in the cache is believed), and a file whose change time moved (here
    its modification time set back, as ``cp -p`` or ``touch -r`` would) is hashed again."""
    import os

    folder = ckpt(tmp_path / "m", 1, tied=True)
    store = tmp_path / "fingerprints"
    monkeypatch.setattr(files, "_fingerprint_dir", lambda: store)
    monkeypatch.setattr(files, "_FINGERPRINTS", {})
    monkeypatch.setattr(files, "_SETTLED_NS", 0)  # these files were written a moment ago
    true = sha256_of(folder)
    assert Checkpoint(folder).fingerprint() == true
    (entry,) = store.glob("*.json")
    assert json.loads(entry.read_text())["sha256"] == true
    entry.write_text(entry.read_text().replace(true, "f" * 64))  # what the cache says is what is used
    files._FINGERPRINTS.clear()
    assert Checkpoint(folder).fingerprint() == "f" * 64
    files._FINGERPRINTS.clear()
    assert Checkpoint(folder).fingerprint(lazy=True) == "f" * 64  # no placeholder, no hashing thread
    shard = sorted(folder.glob("*.safetensors"))[0]
    st = os.stat(shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # same bytes, same mtime: only ctime moves
    files._FINGERPRINTS.clear()
    assert Checkpoint(folder).fingerprint() == true
    files._FINGERPRINTS.clear()
    ck = Checkpoint(folder)
    out = apply(folder, TaskVector.between(folder, folder), tmp_path / "out")  # the lazy path reads the cache too
    assert json.loads(Checkpoint(out).metadata["steering"])["target_sha256"] == true == ck.fingerprint()


def test_a_fingerprint_is_not_remembered_for_files_just_written_or_from_a_corrupt_cache(tmp_path, monkeypatch):
    folder = ckpt(tmp_path / "m", 1, tied=True)
    store = tmp_path / "fingerprints"
    monkeypatch.setattr(files, "_fingerprint_dir", lambda: store)
    monkeypatch.setattr(files, "_FINGERPRINTS", {})
    true = sha256_of(folder)
    assert Checkpoint(folder).fingerprint() == true
    assert not store.exists()  # written within the last seconds: it may still be being written
    monkeypatch.setattr(files, "_SETTLED_NS", 0)
    files._FINGERPRINTS.clear()
    Checkpoint(folder).fingerprint()
    (entry,) = store.glob("*.json")
    for junk in ("not json", "[1, 2]", json.dumps({"files": "x", "sha256": true}),
                 json.dumps({"files": json.loads(entry.read_text())["files"], "sha256": "not hex"})):
        entry.write_text(junk)
        files._FINGERPRINTS.clear()
        assert Checkpoint(folder).fingerprint() == true


def test_pieces_are_the_tensor_and_reuse_no_memory_in_use(trio, monkeypatch):
    base, _, _ = trio
    monkeypatch.setattr(files, "PIECE", 23)
    ck = Checkpoint(base)
    for n in ck.names:
        f = ck.file(n)
        whole = f.get(n).reshape(-1)
        got = [p.clone() for p in f.pieces(n)]
        assert torch.equal(torch.cat(got) if got else whole[:0], whole), n
    # two streams of one file at once (e.g. a sum of vectors that share an input) do not share buffers
    n = max(ck.names, key=ck.numel)
    f = ck.file(n)
    for a, b in zip(f.pieces(n), f.pieces(n)):
        assert a.data_ptr() != b.data_ptr() and torch.equal(a, b)


def test_threads_and_device_options(trio, tmp_path, capsys):
    base, ft, tgt = trio
    before = torch.get_num_threads()
    a = apply(tgt, TaskVector.between(base, ft), tmp_path / "a", threads=1)
    assert torch.get_num_threads() == before  # restored
    b = apply(tgt, TaskVector.between(base, ft), tmp_path / "b", device="cpu", threads=3)
    assert tensor_bytes(a) == tensor_bytes(b)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda'.*CUDA is not available"):
            hdr(tgt, TaskVector.between(base, ft), tmp_path / "c", device="cuda")
        tau = TaskVector.between(base, ft).save(tmp_path / "tau.safetensors")
        assert main(["hdr", str(tgt), "--harm-vector", str(tau), "--out", str(tmp_path / "d"), "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cuda" in err[0]
        assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
    with pytest.raises(ValueError, match="threads must be at least 1"):
        apply(tgt, TaskVector.between(base, ft), tmp_path / "e", threads=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_saved_vector_written_in_pieces_is_the_vector(trio, tmp_path, monkeypatch, dtype):
    """Pieces are written in the background while the next is computed: none may be overwritten first."""
    base, ft, _ = trio
    monkeypatch.setattr(files, "PIECE", 64)
    tau = TaskVector.between(base, ft)
    back = TaskVector.load(tau.save(tmp_path / "tau.safetensors", dtype=dtype))
    for n in tau.names:
        assert torch.equal(back.get(n), tau.get(n).to(dtype).float()), n


def test_a_recipes_hdr_step_takes_the_one_pass_path(trio, tmp_path, monkeypatch):
    from steering.recipe import run

    base, ft, tgt = trio
    calls, real = [], tv._hdr_one_pass
    monkeypatch.setattr(tv, "_hdr_one_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    (tmp_path / "r.yaml").write_text(f"model: {tgt}\nout: {tmp_path / 'out'}\nsteps:\n  - hdr:\n"
                                     f"      harm: {{base: {base}, finetuned: {ft}}}\n      top_k: 0.2\n")
    out = run(tmp_path / "r.yaml", progress=False)
    assert calls == [1]
    from steering.recipe import is_current, load_recipe
    from steering.weights.bake import read_provenance

    inputs = read_provenance(out)["inputs"]  # hashed while the edit read them, filled in at the end
    assert {Path(k).name: v for k, v in inputs.items()} == {p.name: sha256_of(p) for p in (tgt, base, ft)}
    assert is_current(load_recipe(tmp_path / "r.yaml"))
    assert tensor_bytes(out) == tensor_bytes(hdr(tgt, TaskVector.between(base, ft), tmp_path / "direct", top_k=0.2))


def test_ties_and_dare_applied_in_pieces_are_what_their_tensors_say(trio, tmp_path, monkeypatch):
    from steering.weights.taskvec import ties

    base, ft, tgt = trio
    monkeypatch.setattr(files, "PIECE", 41)
    merged = 0.5 * ties([TaskVector.between(base, ft), TaskVector.between(base, tgt)], top_k=0.3)
    dared = TaskVector.between(base, ft).dare(0.5, seed=1)
    for name, v in (("ties", merged), ("dare", dared)):
        out = Checkpoint(apply(base, v, tmp_path / name))
        src = Checkpoint(base)
        for n in v.names:
            want = v.get(n).add_(src.get(n)).to(src.dtype(n))
            assert torch.equal(out.get(n), want), (name, n)


def test_placeholders_are_never_reused(trio, monkeypatch):
    base, ft, _ = trio
    monkeypatch.setattr(files, "_FINGERPRINTS", {})
    a = Checkpoint(base).fingerprint(lazy=True)
    assert files.resolve_fingerprints(a) == sha256_of(base)
    b = Checkpoint(ft).fingerprint(lazy=True)  # a new placeholder after the first was filled in
    assert a != b and files.resolve_fingerprints(a) == sha256_of(base) and files.resolve_fingerprints(b) == sha256_of(ft)


@pytest.mark.parametrize("frac", [0.001, 0.5])
def test_nan_in_the_harm_vector_is_one_error_and_leaves_nothing(tmp_path, frac):
    w = weights(0, tied=False)
    bad = {n: t.clone() for n, t in w.items()}
    bad["layers.0.w"].view(-1)[7] = float("nan")
    base, ft = save_sharded(w, tmp_path / "base", 2), save_sharded(bad, tmp_path / "ft", 2)
    with pytest.raises(ValueError, match="layers.0.w.*NaN"):
        hdr(base, TaskVector.between(base, ft), tmp_path / "out", top_k=frac)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft"]
