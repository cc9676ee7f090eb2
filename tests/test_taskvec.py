"""Task vectors, exact top-k, TIES / DARE and HDR, streamed from checkpoints one tensor at a time."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import steering as st
from steering.weights.taskvec import TaskVector, apply, hdr, ties
from steering.testing import save_sharded
from steering.weights import Checkpoint, write_checkpoint


def tensors(seed, dtype=torch.float32, ties_=False):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (7, 5), "b.weight": (13,), "c.bias": (3, 4, 2), "d.weight": (11, 3), "e.scalar": ()}
    out = {}
    for n, s in shapes.items():
        t = torch.randn(s, generator=g)
        if ties_:  # few distinct magnitudes: many ties at any threshold
            t = torch.randint(-3, 4, s, generator=g).float()
        out[n] = t.to(dtype)
    out["steps"] = torch.tensor([seed], dtype=torch.int64)
    return out


def reference_topk_mask(vals: dict[str, torch.Tensor], frac: float) -> dict[str, torch.Tensor]:
    """A full stable sort of all magnitudes in (name, flat index) order: the first k entries."""
    names = sorted(vals)
    flat = torch.cat([vals[n].reshape(-1).float().abs() for n in names])
    k = min(flat.numel(), int(torch.tensor(frac * flat.numel() - 1e-9).ceil()))
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order] = True
    out, i = {}, 0
    for n in names:
        out[n] = keep[i:i + vals[n].numel()].reshape(vals[n].shape)
        i += vals[n].numel()
    return out


@pytest.fixture
def pair(tmp_path):
    base = save_sharded(tensors(0), tmp_path / "base", 3)
    ft = save_sharded(tensors(1), tmp_path / "ft", 3)
    return base, ft


def test_checkpoint_reads_every_shard_like_safetensors(pair):
    base, _ = pair
    ck = Checkpoint(base)
    assert len(ck.files) == 3
    ref = {}
    for shard in ck.files:
        ref.update(load_file(str(base / shard)))
    assert ck.names == sorted(ref)
    for n in ck.names:
        assert torch.equal(ck.get(n), ref[n]) and ck.dtype(n) == ref[n].dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_task_arithmetic_is_bit_exact(tmp_path, dtype):
    base = save_sharded(tensors(0, dtype), tmp_path / "base", 3)
    ft = save_sharded(tensors(1, dtype), tmp_path / "ft", 3)
    tgt = save_sharded(tensors(2, dtype), tmp_path / "tgt", 2)
    tau = TaskVector.between(base, ft)
    assert "steps" not in tau  # integer tensors never take part
    out = apply(tgt, 0.7 * tau, tmp_path / "out")
    b, f, t = tensors(0, dtype), tensors(1, dtype), tensors(2, dtype)
    got = Checkpoint(out)
    for n in t:
        want = t[n] if n == "steps" else (t[n].float() + 0.7 * (f[n].float() - b[n].float())).to(dtype)
        assert got.dtype(n) == dtype if n != "steps" else True
        assert torch.equal(got.get(n), want), n
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == \
        sorted(p.name for p in tgt.iterdir() if p.suffix == ".safetensors")  # the target's sharding is kept
    prov = json.loads(got.metadata["steering"])
    assert prov["method"] == "task_arithmetic" and prov["scale"] == 1.0
    assert prov["vector"]["terms"][0][0] == 0.7 and len(prov["target_sha256"]) == 64


def test_arithmetic_and_save_load_round_trip(pair, tmp_path):
    base, ft = pair
    tau = TaskVector.between(base, ft)
    combo = 2 * tau - tau + (-tau) / 2
    for n in tau.names:
        torch.testing.assert_close(combo.get(n), 0.5 * tau.get(n), rtol=0, atol=1e-6)
    path = tau.save(tmp_path / "tau.safetensors")
    back = TaskVector.load(path)
    assert back.names == tau.names and back.provenance["method"] == "task_vector"
    for n in tau.names:
        assert torch.equal(back.get(n), tau.get(n))
    with pytest.raises(FileExistsError, match="tau.safetensors"):
        tau.save(path)


@pytest.mark.parametrize("frac", [0.0, 0.03, 0.1, 0.5, 0.97, 1.0])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("piece", [None, 7])
def test_global_top_k_selects_what_a_full_sort_selects(tmp_path, frac, tied, piece, monkeypatch):
    if piece:  # tensors processed in pieces (as big ones are), ties spanning pieces included
        monkeypatch.setattr("steering.weights.files.PIECE", piece)
    base = save_sharded(tensors(0, ties_=tied), tmp_path / "base", 3)
    ft = save_sharded(tensors(1, ties_=tied), tmp_path / "ft", 3)
    tau = TaskVector.between(base, ft)
    vals = {n: tau.get(n) for n in tau.names}
    ref = reference_topk_mask(vals, frac)
    top = tau.top_k(frac, "global")
    n_kept = 0
    for n in tau.names:
        got = top.get(n)
        assert torch.equal(got != 0, ref[n] & (vals[n] != 0)), n
        assert torch.equal(got[ref[n]], vals[n][ref[n]])
        n_kept += int(ref[n].sum())
    assert n_kept == min(tau.numel, int(torch.tensor(frac * tau.numel - 1e-9).ceil()))


def test_per_tensor_top_k(pair):
    tau = TaskVector.between(*pair)
    top = tau.top_k(0.25, "tensor")
    for n in tau.names:
        v = tau.get(n)
        ref = reference_topk_mask({n: v}, 0.25)[n]
        assert torch.equal(top.get(n) != 0, ref & (v != 0))


def test_ties_matches_the_reference_merge(tmp_path):
    b = save_sharded(tensors(0), tmp_path / "b", 2)
    vecs = [TaskVector.between(b, save_sharded(tensors(s), tmp_path / f"f{s}", 2)) for s in (1, 2, 3)]
    merged = ties(vecs, top_k=0.3)
    names = vecs[0].names
    # reference (ties-merging's merge_utils): flatten each task vector, trim, elect, disjoint mean
    flat = torch.stack([torch.cat([v.get(n).reshape(-1) for n in names]) for v in vecs])
    k = int(torch.tensor(0.3 * flat.shape[1] - 1e-9).ceil())
    trimmed = torch.stack([torch.where(torch.zeros_like(r, dtype=torch.bool).index_fill_(
        0, torch.sort(r.abs(), descending=True, stable=True).indices[:k], True), r, torch.zeros(())) for r in flat])
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum()) if sign.sum() != 0 else 1.0
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    want = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    got = torch.cat([merged.get(n).reshape(-1) for n in names])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_dare_is_seeded_and_rescales(pair):
    tau = TaskVector.between(*pair)
    d1, d2, d3 = tau.dare(0.5, seed=1), tau.dare(0.5, seed=1), tau.dare(0.5, seed=2)
    n = "d.weight"
    assert torch.equal(d1.get(n), d2.get(n)) and not torch.equal(d1.get(n), d3.get(n))
    kept = d1.get(n) != 0
    torch.testing.assert_close(d1.get(n)[kept], 2 * tau.get(n)[kept])
    assert 0.2 < kept.float().mean() < 0.8


def test_hdr_subtracts_the_trimmed_harm_vector(tmp_path):
    aligned = save_sharded(tensors(0), tmp_path / "aligned", 2)
    harmful = save_sharded(tensors(1), tmp_path / "harmful", 2)
    target = save_sharded(tensors(2), tmp_path / "target", 2)
    tau = TaskVector.between(aligned, harmful)
    out = hdr(target, tau, tmp_path / "safe", scale=3.0, top_k=0.1)
    trimmed = tau.top_k(0.1)
    got, t = Checkpoint(out), tensors(2)
    for n in tau.names:
        assert torch.equal(got.get(n), (t[n].float() - 3.0 * trimmed.get(n)).to(t[n].dtype))
    prov = json.loads(got.metadata["steering"])
    assert prov["method"] == "hdr" and prov["hdr_scale"] == 3.0 and prov["hdr_top_k"] == 0.1
    assert "hdr" in (out / "README.md").read_text()


def test_written_hf_model_loads_keeps_sharding_and_side_files(tmp_path):
    m = st.testing.tiny_model("llama")
    src = tmp_path / "src"
    m.hf.to(torch.bfloat16).save_pretrained(src, max_shard_size="40KB")
    m.tokenizer.save_pretrained(src)
    base = Checkpoint(src)
    out = write_checkpoint(base, tmp_path / "out", lambda n, t: t, {"method": "copy"})
    assert sorted(os.listdir(out)) == sorted(os.listdir(src) + ["README.md"])
    again = st.load(out)
    assert next(again.hf.parameters()).dtype == torch.bfloat16
    for n, p in again.hf.state_dict().items():
        if n in base:
            assert torch.equal(p, base.get(n)), n
    texts = m.format(["Hi there"])
    torch.testing.assert_close(again.forward(texts), st.load(src).forward(texts), rtol=0, atol=0)


# --- bad inputs: one clear line, and no output folder --------------------------------------
def _no_output(tmp_path, name="out"):
    return not (tmp_path / name).exists() and not any(p.name.startswith(f".{name}") for p in tmp_path.iterdir())


def test_truncated_shard_is_named(pair, tmp_path):
    base, ft = pair
    shard = sorted(ft.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match=f"{shard.name}: truncated"):
        apply(base, TaskVector.between(base, ft), tmp_path / "out")
    assert _no_output(tmp_path)


def test_corrupt_header_is_named(pair):
    base, ft = pair
    shard = sorted(ft.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{shard.name}: corrupt"):
        Checkpoint(ft)


def test_missing_shard_is_named(pair):
    base, ft = pair
    shard = sorted(ft.glob("*.safetensors"))[2]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard.name}: shard named in model.safetensors.index.json is missing"):
        TaskVector.between(base, ft)


def test_mismatched_shapes_and_names_are_named(tmp_path):
    base = save_sharded(tensors(0), tmp_path / "base", 2)
    t = tensors(1)
    t["d.weight"] = torch.zeros(3, 11)
    with pytest.raises(ValueError, match=r"d.weight: shape \(11, 3\) in base"):
        TaskVector.between(base, save_sharded(t, tmp_path / "ft1", 2))
    t = tensors(1)
    t["z.extra"] = torch.zeros(2)
    with pytest.raises(ValueError, match="z.extra: in fine-tune"):
        TaskVector.between(base, save_sharded(t, tmp_path / "ft2", 2))
    t = tensors(1, torch.bfloat16)
    with pytest.raises(ValueError, match="a.weight: dtype"):
        TaskVector.between(base, save_sharded(t, tmp_path / "ft3", 2))


def test_non_floating_tensor_asked_for_is_refused(pair):
    with pytest.raises(ValueError, match="steps: is torch.int64, not floating"):
        TaskVector.between(*pair, include=["weight", "steps"])
    tau = TaskVector.between(*pair, include=r"\.weight$", exclude="^b")
    assert tau.names == ("a.weight", "d.weight")


def test_output_inside_a_source_or_existing_is_refused(pair, tmp_path):
    base, ft = pair
    tau = TaskVector.between(base, ft)
    with pytest.raises(ValueError, match="inside the input"):
        apply(base, tau, base / "edited")
    with pytest.raises(ValueError, match="is the input"):
        apply(ft, tau, base)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="taken: exists"):
        apply(ft, tau, tmp_path / "taken")
    assert not (base / "edited").exists() and list((tmp_path / "taken").iterdir()) == []


def test_pickled_weights_are_never_read(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin; steering never loads pickled weights"):
        Checkpoint(tmp_path / "m")


def _peak_rss_script(body: str) -> str:
    """A script that runs ``body`` and prints its RSS before and its peak RSS after, in bytes.
    (VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child started by a big
    parent inherits the parent's peak.)"""
    return textwrap.dedent("""
        import psutil
        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        """) + textwrap.dedent(body) + "\nprint(before, hwm())\n"


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc for the peak RSS")
def test_streamed_hdr_memory_stays_near_a_few_tensors(tmp_path):
    """HDR with the exact global top-k over three 50-tensor, 200 MB checkpoints, in a fresh process:
    its peak RSS rises over the RSS after imports by far less than one checkpoint (≤ 16 tensors of 4 MB)."""
    g = torch.Generator().manual_seed(0)
    for name, shift in (("base", 0.0), ("ft", 1.0), ("tgt", 2.0)):
        save_sharded({f"t{i:02d}": torch.randn(1 << 20, generator=g) + shift for i in range(50)}, tmp_path / name, 5)
    body = f"""
        from steering.weights.taskvec import TaskVector, hdr
        from steering.weights import Checkpoint
        Checkpoint({str(tmp_path / "base")!r}).get("t00")  # warm up torch and the reader
        before = psutil.Process().memory_info().rss
        tau = TaskVector.between({str(tmp_path / "base")!r}, {str(tmp_path / "ft")!r})
        hdr({str(tmp_path / "tgt")!r}, tau, {str(tmp_path / "out")!r}, scale=3.0, top_k=0.1)
    """
    done = subprocess.run([sys.executable, "-c", _peak_rss_script(body)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    before, peak = map(int, done.stdout.split())
    assert Checkpoint(tmp_path / "out").nbytes > 200 * 2**20
    assert peak - before <= 16 * 4 * 2**20, f"peak RSS grew {(peak - before) / 2**20:.0f} MB during the edit"


def test_output_that_holds_a_source_is_refused(pair, tmp_path):
    """Replacing a folder that holds an input (here the task vector file) would delete the input."""
    base, ft = pair
    (tmp_path / "runs").mkdir()
    path = TaskVector.between(base, ft).save(tmp_path / "runs" / "tau.safetensors")
    with pytest.raises(ValueError, match="would hold the input"):
        apply(base, TaskVector.load(path), tmp_path / "runs", overwrite=True)
    assert path.is_file()
