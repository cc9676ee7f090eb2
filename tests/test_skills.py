"""Skills with exact answers (steering.skills) and their columns in evaluate: mechanics on tiny models."""

import re

import pytest

import steering as st
from steering import skills
from steering.evaluate import Setting, evaluate


@pytest.mark.parametrize("skill", skills.SKILLS)
def test_items_are_fixed_distinct_and_the_splits_never_share_one(skill):
    test = skills.items(skill, "test", 50)
    assert test == skills.items(skill, "test", 50)  # the same order every time
    assert len({it.prompt for it in test}) == 50
    train = {it.prompt for it in skills.items(skill, "train", 400)}
    val = {it.prompt for it in skills.items(skill, "val", 50)}
    assert not (train & {it.prompt for it in test}) and not (train & val) and not (val & {it.prompt for it in test})
    assert skills.items(skill, "test", 50, seed=1) != test


def test_answers_are_right():
    for it in skills.items("sort", n=20):
        letters = it.prompt.removeprefix("Sort these letters: ").split()
        assert it.answer == " ".join(sorted(letters)) and len(letters) >= 3
    for it in skills.items("reverse", n=20):
        words = it.prompt.removeprefix("Reverse these words: ").split()
        assert it.answer == " ".join(words[::-1])
    for it in skills.items("count", n=20):
        assert it.answer == str(len(it.prompt.removeprefix("Count the words: ").split()))
    for it in skills.items("increment", n=20):
        assert it.answer == str(int(re.search(r"after (\d+)\?", it.prompt).group(1)) + 1)
    assert sum(it.answer.endswith("0") for it in skills.items("increment", n=300)) > 60  # carries are common


def test_a_test_item_is_never_a_training_item_reordered():
    def letters(split):
        return {frozenset(it.prompt.split(": ")[1].split()) for it in skills.items("sort", split, 2000)}
    assert not letters("train") & letters("test")


def test_aligned_and_new_skill_are_skills():
    assert set(skills.ALIGNED) | {skills.NEW_SKILL} == set(skills.SKILLS) and skills.NEW_SKILL not in skills.ALIGNED


def test_exact_match_takes_the_first_line_without_a_full_stop():
    assert skills.is_correct(" 771.\nAnything after", "771")
    assert skills.is_correct("a c k", "a c k")
    assert not skills.is_correct("771 is the answer", "771")
    assert not skills.is_correct("77", "771")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown skill 'multiply'"):
        skills.items("multiply")
    with pytest.raises(ValueError, match="split 'dev'"):
        skills.items("sort", "dev")


def test_accuracy_scores_what_the_model_answers():
    m = st.testing.tiny_model("llama")
    answers = {it.prompt: it.answer for it in skills.items("count", n=10)}
    assert skills.accuracy(m, "count", n=10, generate=lambda ps: [answers[p] for p in ps]) == 1.0
    assert skills.accuracy(m, "count", n=10, generate=lambda ps: [answers[p] + "1" for p in ps]) == 0.0
    half = list(answers)[:5]
    assert skills.accuracy(m, "count", n=10, generate=lambda ps: [answers[p] if p in half else "0" for p in ps]) == 0.5
    assert 0.0 <= skills.accuracy(m, "sort", n=4) <= 1.0  # the model's own greedy replies


def test_evaluate_reports_each_skill_and_their_mean(monkeypatch, tmp_path):
    m = st.testing.tiny_model("llama")
    truth = {it.prompt: it.answer for k in ("count", "sort") for it in skills.items(k, n=8)}
    from steering import safeinfer

    real = safeinfer.generate

    def knows_count_only(model, prompts, **kw):  # the model answers every count item and no sort item
        outs = real(model, prompts, **kw)
        return [truth[p] if p in truth and p.startswith("Count") else o for p, o in zip(prompts, outs)]

    monkeypatch.setattr("steering.safeinfer.generate", knows_count_only)
    rep = evaluate(m, [Setting("plain")], limit=4, n_utility=4, max_new_tokens=4, skills=["count", "sort"], n_skill=8,
                   progress=False)
    row = rep.rows["plain"]
    assert row["skill_count"] == 1.0 and row["skill_sort"] == 0.0 and row["utility"] == 0.5
    assert rep.table().splitlines()[0].endswith("| count | sort | utility |")
    assert rep.table().splitlines()[2].endswith("| 100.0% | 0.0% | 50.0% |")
    rep.save(tmp_path / "r")
    assert (tmp_path / "r" / "report.png").stat().st_size > 0
    plain = evaluate(m, [Setting("plain")], limit=4, n_utility=4, max_new_tokens=4, progress=False)
    assert "utility" not in plain.rows["plain"] and "utility" not in plain.table()


def test_cli_eval_takes_skills_and_refuses_an_unknown_one(tmp_path, capsys):
    from steering.cli import main

    folder = tmp_path / "m"
    st.testing.tiny_hf_model("llama").save_pretrained(folder)
    st.testing.tiny_tokenizer().save_pretrained(folder)
    with pytest.raises(SystemExit) as e:  # argparse's own refusal, naming the option
        main(["eval", str(folder), "--skills", "count,multiply", "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    assert "argument --skills: 'count,multiply': skills are sort, reverse, count, increment" in capsys.readouterr().err
    assert main(["eval", str(folder), "--skills", "increment", "--n-skill", "4", "--limit", "2", "--n-utility", "2",
                 "--max-new-tokens", "2", "--out", str(tmp_path / "r")]) == 0
    assert "| increment | utility |" in (tmp_path / "r" / "report.md").read_text()


def test_an_evaluation_recipe_takes_skills_and_names_an_unknown_one():
    from pydantic import ValidationError

    from steering.recipe import EvalRecipe

    r = EvalRecipe.model_validate({"model": "m", "out": "o", "settings": [{"name": "plain"}], "skills": ["count", "increment"]})
    assert r.skills == ["count", "increment"] and "skills" not in EvalRecipe.model_validate(
        {"model": "m", "out": "o", "settings": [{"name": "plain"}]}).model_dump(exclude_none=True)
    with pytest.raises(ValidationError, match="unknown skill 'spell'"):
        EvalRecipe.model_validate({"model": "m", "out": "o", "settings": [{"name": "plain"}], "skills": ["spell"]})
