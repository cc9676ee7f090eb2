"""The steering command, as a user runs it."""

import json
import subprocess
import sys

import pytest

import steering as st
from steering.cli import main


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "steering.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("info", "datasets", "record", "main"):
        assert cmd in out


def test_the_process_entry_point_freezes_and_main_does_not(tmp_path):
    """``run`` (what ``steering`` and ``python -m steering.cli`` call) keeps the imports' objects out
    of the garbage collector before the job and what the job left after it, and returns main's
    status; ``main``, which notebooks call, freezes nothing."""
    missing = str(tmp_path / "missing")
    code = ("import gc\nimport steering.cli.parser as p\nreal, seen = p.main, []\n"
            f"m = real(['info', {missing!r}])\nassert gc.get_freeze_count() == 0, 'main froze'\n"
            "p.main = lambda argv: seen.append(gc.get_freeze_count()) or real(argv)\n"
            f"r = p.run(['info', {missing!r}])\nprint(m, r, seen[0] > 10000, gc.get_freeze_count() > seen[0])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "2", "True", "True"]
    assert done.stderr.count("missing") == 2  # both still report the error
    done = subprocess.run([sys.executable, "-m", "steering.cli", "info", missing], capture_output=True, text=True)
    assert done.returncode == 2 and "missing" in done.stderr


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    m = st.testing.tiny_model("gpt2")
    m.hf.save_pretrained(path)
    m.tokenizer.save_pretrained(path)
    return path


def test_info_and_record(folder, tmp_path, capsys):
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "gpt2" in out and "in_out" in out and "transformer.wpe" in out
    assert main(["record", str(folder), "--prompts", "harmful:val", "--limit", "8", "--sites", "resid_pre,mlp_out",
                 "--out", str(tmp_path / "r.safetensors")]) == 0
    assert (tmp_path / "r.safetensors").exists()


def test_errors_are_one_line(folder, tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing" in err
    assert main(["record", str(folder), "--prompts", "harmfull", "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "harmfull" in err and err.count("\n") == 0
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.organisms  # builds the quick recipe's organisms
def test_main_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("STEERING_CACHE", str(tmp_path / "cache"))  # the quick recipe's organisms stay out of the real cache
    assert main(["main", "--out", str(tmp_path / "run"), "--quick"]) == 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert report.startswith("# steering main job") and "chosen by `steering.tune`" in report
    for method in ("addition", "conditional", "icv", "hdr", "safeinfer"):  # each setting came from a search
        assert json.loads((tmp_path / "run" / f"tune-{method}" / "tune.json").read_text())["method"] == method
