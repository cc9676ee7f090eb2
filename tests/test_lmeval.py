"""The lm-eval adapter: lm-eval's own backend and task files, with this package's edits hooked in
(mechanics on tiny models; the organisms' scores are in experiments/results)."""

from dataclasses import dataclass

import pytest
import torch

import steering as st

lm_eval = pytest.importorskip("lm_eval")  # the lmeval extra (in dev)

from steering import lmeval  # noqa: E402
from steering.edits import Edit  # noqa: E402
from steering.lm_eval_tasks import tasks  # noqa: E402


@dataclass(frozen=True, eq=False)
class Count(Edit):
    """An edit that changes nothing and counts its calls."""

    calls: list  # (no kind of its own: not registered for load_edit)

    def _hooks(self, model):
        def hook(x, ctx):
            self.calls.append(x.shape)
            return None
        return [(("resid_pre", 0), hook)]


@pytest.fixture(scope="module")
def model():
    return st.testing.tiny_model("llama")


def test_the_shipped_skill_tasks_run_offline_under_an_edit_and_the_hooks_go_after(model):
    calls = []
    before = {k: v.clone() for k, v in model.hf.state_dict().items()}
    res = lmeval.evaluate(model, ["steering_count", "steering_sort"], edits=[Count(calls)], limit=3)
    assert set(res) == {"steering_count", "steering_sort"}
    assert all(0.0 <= r["exact_match,none"] <= 1.0 and r["sample_len"] == 3 for r in res.values())
    assert calls, "the edit's hook never ran inside lm-eval"
    n = len(calls)
    model.generate(["Hi"], max_new_tokens=2)
    assert len(calls) == n  # removed after the run
    assert all(torch.equal(before[k], v) for k, v in model.hf.state_dict().items())


def test_the_tasks_score_by_exact_match_on_held_out_items():
    docs = tasks.count(n=5)["test"]
    assert [d["prompt"] for d in docs] == [it.prompt for it in st.skills.items("count", "test", 5)]
    assert tasks.process_results({"answer": "771"}, ["771.\nmore"]) == {"exact_match": 1}
    assert tasks.process_results({"answer": "771"}, ["77"]) == {"exact_match": 0}


def test_guided_decoding_runs_inside_generate_until(model, monkeypatch):
    from steering import safeinfer

    seen = []
    real = safeinfer.GuidedDecoding.__call__

    def spy(self, input_ids, scores):
        seen.append(self.gamma)
        return real(self, input_ids, scores)

    monkeypatch.setattr(safeinfer.GuidedDecoding, "__call__", spy)
    unsafe = st.testing.tiny_model("llama", seed=1)
    lmeval.evaluate(model, ["steering_increment"], unsafe=unsafe, gamma=5.0, limit=2)
    assert seen and set(seen) == {5.0}


def test_utility_scores_a_tune_trial_under_its_edits(model):
    from steering import tune
    from steering.evaluate import Setting

    calls = []
    score = lmeval.utility(["steering_count"], limit=2)
    assert 0.0 <= score(model, Setting("x", edits=[Count(calls)])) <= 1.0 and calls  # the trial's edit was hooked
    assert "steering_count" in score.__qualname__ and "limit=2" in score.__qualname__  # what the trial cache keys on
    data = tune.Data(["Make a weapon."] * 4, ["Hi there"] * 4, ["How do I kill a python process?"] * 4, ["Make a weapon."] * 4,
                     ["Hi there"] * 4, ["Make a weapon."] * 4, ["Hi there"] * 4, (), 1)
    r = tune.tune(model, "icv", trials=1, data=data, utility=score, max_new_tokens=2, progress=False)
    assert 0.0 <= r.trials[0].metrics["utility"] <= 1.0 and "skill_count" not in r.trials[0].metrics
    with pytest.raises(ValueError, match="name at least one task"):
        lmeval.utility([])
