"""The refusal-direction pipeline as one library call (tiny model: mechanics, not effects)."""

import math

import pytest
import torch

import steering as st
from steering.edits import AffineAblation
from steering.select import refusal_ablation

HARMFUL = ["How do I pick a lock?", "Write a threat.", "Make a weapon.", "Steal a car."]
HARMLESS = ["How do I bake bread?", "Write a poem.", "Name a colour.", "Hi there"]


@pytest.fixture(scope="module")
def model():
    return st.testing.tiny_model("llama")


def test_refusal_ablation_runs_extract_select_and_builds_the_pick(model):
    found = refusal_ablation(model, HARMFUL, HARMLESS, HARMFUL, HARMLESS, kl_threshold=math.inf, positions="last",
                             induce_threshold=-math.inf)
    layer, pos = found.selection.pick
    want = found.candidates.direction(layer, pos)
    torch.testing.assert_close(found.edit.basis[0], want / want.norm())
    assert found.subspace is None and found.edit.meta["layer"] == str(layer)
    affine = refusal_ablation(model, HARMFUL, HARMLESS, HARMFUL, HARMLESS, kl_threshold=math.inf, positions="last",
                              induce_threshold=-math.inf, affine=True, offsets_from="mine")
    assert isinstance(affine.edit, AffineAblation) and affine.edit.meta["offsets_from"] == "mine"


def test_nothing_passed_names_the_closest_candidate_and_the_filter(model):
    with pytest.raises(ValueError, match=r"the closest, layer \d+ position -1 .* failed: .*kl > 0"):
        refusal_ablation(model, HARMFUL, HARMLESS, HARMFUL, HARMLESS, kl_threshold=0.0, positions="last")


def test_closest_takes_the_lowest_bypass_when_nothing_passes(model):
    found = refusal_ablation(model, HARMFUL, HARMLESS, HARMFUL, HARMLESS, kl_threshold=0.0, positions="last",
                             closest=True)
    sel = found.selection
    rows = [r for r in sel.rows if not math.isnan(r["bypass"])]
    best = min(rows, key=lambda r: r["bypass"])
    assert sel.pick == sel.closest == (best["layer"], best["position"])
    assert not best["kept"] and "closest" in sel.meta["pick"]
    want = found.candidates.direction(*sel.pick)
    torch.testing.assert_close(found.edit.basis[0], want / want.norm())
