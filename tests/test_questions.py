"""The built-in question generator: its kinds, the wh-questions, and the filter for model output."""

import pytest

from ipm import Config
from ipm.errors import InvalidInput
from ipm.questions import QUESTION_KINDS, builtin_questions, keep_generated, verb_base, wh_questions

TEXT = "Jon visited Paris recently. He loved the Louvre and planned a second trip with his sister Anna."


def test_builtin_questions_start_with_the_text_and_are_distinct_and_deterministic():
    qs = builtin_questions("jon_paris_louvre", TEXT, 24, seed=3)
    assert qs[0] == TEXT
    assert 10 <= len(qs) <= 24
    assert len({q.lower().strip(" ?.!") for q in qs}) == len(qs)
    assert qs == builtin_questions("jon_paris_louvre", TEXT, 24, seed=3)
    assert qs != builtin_questions("jon_paris_louvre", TEXT, 24, seed=4)


def test_each_kind_draws_only_from_its_source():
    spans = builtin_questions("jon_paris_louvre", TEXT, 24, kinds=["spans"])
    assert len(spans) > 3 and all(q in TEXT for q in spans)
    assert set(builtin_questions("jon_paris_louvre", TEXT, 24, kinds=["id"])[1:]) == {"paris louvre", "jon paris louvre"}
    wh = builtin_questions("jon_paris_louvre", TEXT, 24, kinds=["wh"])[1:]
    assert wh and set(wh) <= set(wh_questions(TEXT))
    assert builtin_questions("jon_paris_louvre", TEXT, 24, kinds=[]) == [TEXT]
    everything = builtin_questions("jon_paris_louvre", TEXT, 200, kinds=QUESTION_KINDS)
    assert set(wh) & set(everything) and any(q in TEXT for q in everything[1:])


@pytest.mark.parametrize("word,base,tense", [
    ("visited", "visit", "past"), ("loved", "love", "past"), ("planned", "plan", "past"), ("tried", "try", "past"),
    ("lost", "lose", "past"), ("attended", "attend", "past"), ("appreciates", "appreciate", "present"),
    ("watches", "watch", "present"), ("enjoys", "enjoy", "present"),
])
def test_verb_base(word, base, tense):
    assert verb_base(word) == (base, tense)


def test_wh_questions_turn_a_statement_into_questions_about_its_subject_and_verb():
    qs = wh_questions("Caroline attended an LGBTQ support group recently and found the stories inspiring.")
    assert "What did Caroline attend?" in qs
    assert "Who attended an LGBTQ support group recently?" in qs
    assert "When did Caroline attend an LGBTQ support group recently?" in qs
    assert "What is my dog's name?" in wh_questions("My dog's name is Max.")
    assert "What is Jon starting?" in wh_questions("Jon is starting his own dance studio.")
    assert "What does Gina have?" in wh_questions("Gina has an online store.")
    assert "What did he love?" in wh_questions(TEXT)
    assert wh_questions("Paris, recently.") == []


def test_model_written_questions_must_name_something_of_the_memory():
    text = "Caroline attended an LGBTQ support group."
    assert not keep_generated("What does this fact mean?", text)
    assert not keep_generated("What is the weather today?", text)
    assert keep_generated("Which support group did Caroline go to?", text)


def test_config_checks_question_kinds():
    assert Config().updated(question_kinds=["wh", "spans"]).question_kinds == ["wh", "spans"]
    with pytest.raises(InvalidInput, match="question_kinds"):
        Config().updated(question_kinds=["paraphrases"])
