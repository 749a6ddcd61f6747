import pytest

from ipm.errors import InvalidID
from ipm.ids import ID_PATTERN, mint_id, validate_id


@pytest.mark.parametrize("good", ["personal_pet_max", "personal_gear_herman_miller", "a_b_c", "work_2024_q3_plan"])
def test_valid_ids(good):
    assert validate_id(good) == good


@pytest.mark.parametrize("bad", ["", "pet_max", "Personal_pet_max", "personal-pet-max", "personal__pet_max",
                                 "_personal_pet", "personal_pet_", "personal pet max", "personal_pét_max", "x" * 81 + "_a_b",
                                 "personal_pet_max\n"])  # `$` alone would let a final newline through
def test_invalid_ids_raise_with_a_hint(bad):
    with pytest.raises(InvalidID, match="personal_pet_max|longer than"):
        validate_id(bad)


def test_mint_reads_like_the_text():
    assert mint_id("My dog's name is Max.") == "personal_pet_max"
    assert mint_id("I'm allergic to penicillin — found out in 2019.") == "health_allergy_penicillin"
    assert mint_id("I work at Acme Corp as a data engineer.") == "work_job_acme_corp"


def test_mint_is_unique_and_deterministic():
    taken = {"personal_pet_max"}
    first = mint_id("My dog's name is Max.", taken)
    assert first == "personal_pet_max_2"
    assert mint_id("My dog's name is Max.", taken) == first
    taken.add(first)
    assert mint_id("My dog's name is Max.", taken) == "personal_pet_max_3"


@pytest.mark.parametrize("text", ["!!!", "Zoë runs the café in São Paulo", "日本語のテキスト", "12345", "a"])
def test_minted_ids_are_always_valid(text):
    for scheme in ("lexicon", "salient"):
        assert ID_PATTERN.match(mint_id(text, scheme=scheme)), scheme


def test_salient_ids_name_the_person_then_the_rarest_words():
    fact = "Caroline attended an LGBTQ support group recently and found the transgender stories inspiring."
    assert mint_id(fact, scheme="salient") == "caroline_lgbtq_transgender"
    assert mint_id(fact, scheme="lexicon") == "note_caroline_lgbtq"
    # The person may come later in the sentence; a capitalised common word is not a person.
    assert mint_id("Painting is a fun way for Melanie to relax.", scheme="salient").startswith("melanie_")
    # First-person memories keep the lexicon's domain and topic.
    assert mint_id("My dog's name is Max.", scheme="salient") == "personal_pet_max"
    taken = {"caroline_lgbtq_transgender"}
    assert mint_id(fact, taken, scheme="salient") == "caroline_lgbtq_transgender_2"


def test_unknown_scheme_is_refused():
    with pytest.raises(InvalidID, match="scheme"):
        mint_id("My dog's name is Max.", scheme="random")


def test_a_memory_in_another_script_gets_a_readable_id_and_latin_words_keep_their_fold():
    from ipm.ids import slug

    assert slug("собака") == "sobaka" and slug("Μαξ") == "max" and slug("東京") == "dongjing"
    assert slug("Tromsø") == "troms" and slug("Zoë") == "zoe" and slug("Café") == "cafe"  # as minted so far
    assert slug("—") == "" and slug("...") == ""
    for scheme in ("salient", "lexicon"):
        minted = mint_id("Моя собака Макс — бигль.", set(), scheme)
        assert ID_PATTERN.match(minted) and "misc" not in minted, minted
        assert minted == mint_id("Моя собака Макс — бигль.", set(), scheme)
    assert mint_id("Ο σκύλος μου λέγεται Μαξ.", set(), "salient").startswith("max_")
