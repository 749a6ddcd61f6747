"""The built-in question generator: its kinds, the wh-questions, and the filter for model output."""

import pytest

from ipm import Config
from ipm.errors import InvalidInput
from ipm.questions import (
    ALIAS_VARIANTS,
    DEFAULT_QUESTION_KINDS,
    Aliases,
    QUESTION_KINDS,
    RelatedWords,
    builtin_questions,
    keep_generated,
    related_words,
    verb_base,
    wh_questions,
)

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
    everything = builtin_questions("jon_paris_louvre", TEXT, 200, kinds=DEFAULT_QUESTION_KINDS)
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


def test_model_written_questions_leave_the_shared_tokenizer_alone(tiny_model, tmp_path):
    """The base model's tokenizer is shared with asks a server answers meanwhile: generation
    pads on the left with a tokenizer of its own, never by changing that one."""
    from ipm.config import Paths
    from ipm.model import load_base
    from ipm.questions import llm_questions

    base = load_base(Config(base_model=str(tiny_model)), Paths.at(tmp_path / "home", tmp_path / "cache"))
    shared = base.tokenizer
    before = (shared.padding_side, shared.pad_token)
    seen = []
    memories = [("personal_pet_max", "My dog's name is Max and he is a beagle."),
                ("family_sister_anna", "My sister Anna lives in Berlin.")]
    out = llm_questions(base, memories, n=2, batch_size=1,
                        progress=lambda done: seen.append((shared.padding_side, shared.pad_token)))
    assert seen == [before, before] and base.tokenizer is shared
    assert set(out) == {"personal_pet_max", "family_sister_anna"}
    assert all(len(qs) <= 2 and all(keep_generated(q, dict(memories)[mid]) for q in qs) for mid, qs in out.items())


def test_config_checks_question_kinds():
    assert Config().updated(question_kinds=["wh", "spans"]).question_kinds == ["wh", "spans"]
    assert Config().updated(question_kinds=list(QUESTION_KINDS)).question_kinds == list(QUESTION_KINDS)
    assert Config().question_kinds == list(DEFAULT_QUESTION_KINDS) and "related" not in Config().question_kinds
    with pytest.raises(InvalidInput, match="question_kinds"):
        Config().updated(question_kinds=["paraphrases"])


NEAR = {"visited": ["toured", "saw"], "loved": ["adored"], "trip": ["journey", "voyage"], "sister": ["sibling", "brother"],
        "recently": ["lately"], "planned": ["march"], "paris": ["london"], "anna": ["maria"]}


def test_related_questions_swap_common_words_for_near_ones_and_keep_names_and_dates():
    qs = builtin_questions("jon_paris_louvre", TEXT, 200, kinds=["related"], related=lambda w: NEAR.get(w, []))[1:]
    words = [set(q.lower().strip("?").replace("remind me:", "").split()) for q in qs]
    assert len(qs) >= 5
    swapped_in = {x for near in NEAR.values() for x in near}
    assert all(w & swapped_in for w in words)  # every one says something in other words
    assert not any(w & {"london", "maria", "march"} for w in words)  # names and months are not swapped
    assert qs == builtin_questions("jon_paris_louvre", TEXT, 200, kinds=["related"], related=lambda w: NEAR.get(w, []))[1:]
    assert builtin_questions("jon_paris_louvre", "Paris, 1987.", 24, kinds=["related"], related=lambda w: ["x"]) == \
        ["Paris, 1987."]
    sister = builtin_questions("x_y_z", "My sister's car broke down.", 200, kinds=["related"],
                               related=lambda w: NEAR.get(w, []))[1:]
    assert any("sibling" in q or "brother" in q for q in sister)  # "sister's" is the common word sister
    with pytest.raises(InvalidInput, match="related"):
        builtin_questions("jon_paris_louvre", TEXT, 24, kinds=["related"])


VECTORS = {"dog": (1, 0, 0), "dogs": (0.99, 0.1, 0), "puppy": (0.9, 0.3, 0), "canine": (0.8, 0.5, 0),
           "car": (0, 0, 1), "vehicle": (0, 0.2, 0.98), "the": (1, 0, 0)}


class FakeEncoder:
    """Unit vectors by hand (VECTORS): dog ~ puppy ~ dogs, far from car; counts its calls."""

    def __init__(self):
        import types

        vocab = {w: i for i, w in enumerate(list(VECTORS) + ["##ing", "a1"])}
        self.model = types.SimpleNamespace(tokenizer=types.SimpleNamespace(get_vocab=lambda: vocab))
        self.fingerprint = "fake 1"
        self.calls = 0

    def encode(self, texts):
        import torch

        self.calls += 1
        v = torch.tensor([VECTORS.get(t, (0, 1, 0)) for t in texts], dtype=torch.float32)
        return v / v.norm(dim=1, keepdim=True)


def test_related_words_are_near_in_embedding_space_without_inflections_and_cached(tmp_path):
    enc = FakeEncoder()
    rw = RelatedWords(enc, tmp_path, k=2, min_cosine=0.6)
    assert "the" not in rw.words and "##ing" not in rw.words and "a1" not in rw.words  # whole, non-stop words
    assert rw("dog") == ["puppy", "canine"]  # "dogs" is an inflection, "car" too far
    assert rw("Car") == ["vehicle"]
    assert rw("hound") == []  # encoded on the fly: (0, 1, 0) is near nothing in the vocabulary
    assert list(tmp_path.glob("related-words-*.npy"))
    calls = enc.calls
    assert RelatedWords(enc, tmp_path, k=2)("dog") == ["puppy", "canine"] and enc.calls == calls  # from the cache
    enc.fingerprint = "fake 2"  # another encoder: its own vectors, not the cached ones
    RelatedWords(enc, tmp_path, k=2)
    assert enc.calls == calls + 1 and len(list(tmp_path.glob("related-words-*.npy"))) == 2
    empty = FakeEncoder()
    empty.model.tokenizer.get_vocab = lambda: {"##s": 0, "a": 1}
    with pytest.raises(InvalidInput, match="vocabulary"):
        RelatedWords(empty, tmp_path)


def test_related_words_are_built_once_per_encoder_and_cache(tmp_path):
    enc = FakeEncoder()
    first = related_words(enc, tmp_path)
    calls = enc.calls
    assert related_words(enc, tmp_path) is first and enc.calls == calls  # no reload, no re-encode
    assert related_words(FakeEncoder(), tmp_path) is not first


FAMILY = [
    "My wife Priya is an ER nurse and works night shifts.",
    "Priya's car is a white Toyota Prius.",
    "Our son Leo turns 4 on December 5th.",
    "Leo goes to Little Acorns daycare.",
    "My manager is Rebecca Lindqvist; we meet every Tuesday.",
    "My birthday is July 22nd.",
    "My friend Anna lives in Berlin.",
    "My friend Tom plays chess.",
    "My primary care doctor is Dr. Alicia Moreno. My dog's name is Max.",
    "My son Leo loves garbage trucks.",
    "My sister Łucja lives in Kraków.",
]


def test_aliases_are_read_from_relations_that_introduce_a_name():
    a = Aliases(FAMILY)
    assert a.phrase_of["Priya"] == "my wife" and a.name_of["my wife"] == "Priya"
    assert a.phrase_of["Leo"] == "our son"  # "our son" and "my son" are one relation, as first written
    assert a.phrase_of["Rebecca Lindqvist"] == a.phrase_of["Rebecca"] == "my manager"
    assert a.phrase_of["Alicia Moreno"] == "my primary care doctor"  # the title is not the name
    assert a.phrase_of["Max"] == "my dog" and a.phrase_of["Łucja"] == "my sister"
    # a birthday is no relation; a relation with two names is not swapped back to either
    assert "July" not in a.phrase_of and "my birthday" not in a.name_of
    assert a.phrase_of["Anna"] == a.phrase_of["Tom"] == "my friend" and "my friend" not in a.name_of
    # a name given two relations is left out, and its first name with it
    sam = Aliases(["My brother Sam is 30.", "My coach Sam is strict.", "My manager is Sam Lee."])
    assert "Sam" not in sam.phrase_of and sam.phrase_of["Sam Lee"] == "my manager"
    assert len(Aliases(["Caroline attended a support group.", "Melanie paints."])) == 0


@pytest.mark.parametrize("text,expected", [
    ("My manager is German.", {}),  # not a name
    ("Like my dad, Sarah loves fishing.", {}),  # a comma, then the next clause
    ("My wife, Priya, is a nurse.", {"Priya": "my wife"}),  # a comma around an apposition
    ("My boss Rebecca's Tesla is red.", {"Rebecca": "my boss"}),  # a possessive ends the name
    ("My wife and my son Leo went to Paris.", {"Leo": "my son"}),
    ("My neighbor Mrs. Chen waters the plants.", {"Chen": "my neighbor"}),
    ("My friend Tom I met at school.", {"Tom": "my friend"}),
])
def test_alias_patterns(text, expected):
    assert Aliases([text]).phrase_of == expected


def test_alias_variants_swap_a_name_and_its_relation_both_ways():
    a = Aliases(FAMILY)
    assert a.variants("What car does Priya drive?") == ["What car does my wife drive?"]
    assert a.variants("Priya's car?") == ["My wife's car?"]
    assert a.variants("When does my son go to daycare?") == ["When does Leo go to daycare?"]  # my son = our son
    assert a.variants("When is my wife's shift?") == ["When is Priya's shift?"]
    assert a.variants("Who is Rebecca Lindqvist?") == ["Who is my manager?"]  # not "my manager Lindqvist"
    assert a.variants("Where is Dr. Alicia Moreno's office?") == ["Where is my primary care doctor's office?"]
    assert a.variants("Where does Anna live?") == ["Where does my friend live?"]
    assert a.variants("Who is Łucja Nowak?") == []  # another Łucja
    # nothing to swap where the question or the memory already says who is who
    assert a.variants("Who is my wife Priya?") == []
    assert a.variants("Where does Priya work?", text=FAMILY[0]) == []
    assert a.variants("Where does my friend live?") == []  # two friends: which one?
    assert a.variants("What is the capital of France?") == []


def test_alias_questions_are_added_only_to_memories_that_name_an_alias():
    a = Aliases(FAMILY)
    kinds = [*DEFAULT_QUESTION_KINDS, "aliases"]
    car = builtin_questions("personal_car_prius", FAMILY[1], 24, kinds=kinds, aliases=a)
    plain = builtin_questions("personal_car_prius", FAMILY[1], 24)
    assert car[:len(plain)] == plain and car == builtin_questions("personal_car_prius", FAMILY[1], 24, kinds=kinds,
                                                                   aliases=a)
    added = car[len(plain):]
    assert 1 <= len(added) <= ALIAS_VARIANTS and all("my wife" in q.lower() and "Priya" not in q for q in added)
    assert added[0] == "My wife's car is a white Toyota Prius."  # the text itself first
    # the memory that introduces the alias, and one naming no alias, keep their questions
    for mid, text in [("family_wife_job", FAMILY[0]), ("personal_birthday_self", FAMILY[5])]:
        assert builtin_questions(mid, text, 24, kinds=kinds, aliases=a) == builtin_questions(mid, text, 24)
    with pytest.raises(InvalidInput, match="Aliases"):
        builtin_questions("personal_car_prius", FAMILY[1], 24, kinds=["aliases"])


def test_content_words_are_kept_in_any_script():
    """A memory written in Cyrillic or Greek has content words too: they match a question before
    training (pending) and make its keyword questions."""
    from ipm.questions import content_words

    assert content_words("Моя собака Макс — бигль.") == ["моя", "собака", "макс", "бигль"]
    assert content_words("Ο σκύλος μου λέγεται Μαξ") == ["σκύλος", "μου", "λέγεται", "μαξ"]
    assert content_words("My dog's name is Max — born 2019!") == ["dog", "max", "born", "2019"]  # as before


def test_a_memory_in_another_script_is_found_by_its_words_before_training(tmp_path):
    import ipm

    mem = ipm.open(tmp_path / "home", cache=tmp_path / "cache")
    mem.add("Моя собака Макс — бигль.")
    hits = mem.ask("собака Макс?", k=1).hits
    assert [h.text for h in hits] == ["Моя собака Макс — бигль."] and hits[0].pending
    mem.store.close()
