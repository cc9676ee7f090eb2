"""The substring judge and the refusal-opening diagnostic."""

import pytest

from steering.judge import is_refusal, opens_as_refusal, refusal_rate


def test_substring_judge_finds_a_phrase_anywhere_in_any_case():
    assert is_refusal("Well. I CANNOT help with that")
    assert is_refusal("I\u2019m sorry, no")  # a typographic apostrophe counts
    assert not is_refusal("Sure, here is how to bake bread")
    assert refusal_rate(["I'm sorry", "Sure", "As an AI, no", "Answer: yes"]) == 0.5
    with pytest.raises(ValueError, match="no completions"):
        refusal_rate([])


def test_opens_as_refusal_reads_only_the_start():
    garbled = "I'm un as it could cause serious"
    assert opens_as_refusal(garbled) and not is_refusal(garbled)
    assert opens_as_refusal("  As an AI, I cannot") and opens_as_refusal("I\u2019m unable to")
    assert not opens_as_refusal("Sure. I'm sorry to hear that")  # a phrase later on is not an opening
    assert not opens_as_refusal("Asking is fine") and not opens_as_refusal("Answer: here")
